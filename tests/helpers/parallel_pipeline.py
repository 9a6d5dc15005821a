"""Functions that tests run in several processes (minigpt.parallel.launch.spawn imports them by
name): the written-out pipeline and torch's own in the same processes, to start them once."""

from minigpt.parallel.pipeline import pipeline_worker, torch_pipeline_worker


def both_pipelines(rank, world, config, seed, idx, targets, runs, torch_runs, dtype):
    ours = pipeline_worker(rank, world, config, seed, idx, targets, runs, len(runs), False, dtype)
    theirs = []
    if torch_runs:
        theirs = torch_pipeline_worker(rank, world, config, seed, idx, targets, torch_runs, dtype)
    return {"ours": ours, "torch": theirs}
