"""Reading the measured results back, without TensorFlow (the report and run.json use it): the
sanity threshold and each method's fully-randomized row, a layer sweep row's lift and the best
layer. The measuring itself is in ``quality`` and ``layer_sweep``."""
from typing import Dict, Iterable, Optional

from ..evaluation.metric_rules import OVERALL, lift

# A method is flagged when its maps still correlate above this with the original ones once
# every layer is randomized (the last step of the curve; earlier steps may stay higher).
SANITY_THRESHOLD = 0.5


def sanity_final_rows(rows: Iterable[dict]) -> Dict[str, dict]:
    """Per method, its ``sanity.parquet`` row at the last (fully randomized) step."""
    final: Dict[str, dict] = {}
    for row in rows:
        if row["step"] >= final.get(row["method"], {}).get("step", -1):
            final[row["method"]] = row
    return final


def sweep_lift(row: dict) -> Optional[float]:
    """A ``layer_sweep.parquet`` row's mask energy over mask area (1 = no preference)."""
    return lift(row.get("energy"), row.get("area"))


def best_sweep_layer(rows: Iterable[dict]) -> Optional[str]:
    """The layer whose Grad-CAM puts most mass on the masks, relative to their area, overall."""
    lifts = [(sweep_lift(r), r["layer"]) for r in rows if r["slice"] == OVERALL]
    lifts = [(lift, layer) for lift, layer in lifts if lift is not None]
    return max(lifts, key=lambda pair: pair[0])[1] if lifts else None
