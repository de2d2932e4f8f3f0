"""The job: plan (validate everything before anything is written), run the pipeline, count,
gate, write run.json; ``cost`` estimates the passes per stage up front.
"""
