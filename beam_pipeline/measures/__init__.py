"""Dataset-level measures: permutation importance, faithfulness and sanity (explanation
quality), attention by slice and region; the readings the report needs (``results``) import no
TensorFlow.
"""
