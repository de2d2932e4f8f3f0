"""The exit codes of ``xai-audit run`` (DESIGN.md, README's exit-code table) and the rule that
turns gates into one."""
from typing import List

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATE, EXIT_ERROR_RATE, EXIT_REPORT = 0, 1, 2, 3, 4, 5


def of_gates(gates: List[dict]) -> int:
    """4 when too many examples failed (the figures cover too little of the data), else 3 when
    any other gate failed, else 0."""
    failed = {g["gate"] for g in gates if not g["passed"]}
    if "max_error_rate" in failed:
        return EXIT_ERROR_RATE
    return EXIT_GATE if failed else EXIT_OK
