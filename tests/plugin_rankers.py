"""Plug-in rankers for the tests (`--ranker python:plugin_rankers:NAME`); the tests directory is on sys.path."""


def by_length(prompts, responses):
    return [[float(len(r)) for r in rs] for rs in responses]


def rock_paper_scissors(prompts, responses):
    return [[[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]] for _ in prompts]


def wrong_shape(prompts, responses):
    return [[1.0] for _ in prompts]


def crashes(prompts, responses):
    raise KeyError("boom")


def noisy(prompts, responses):
    """Prints and warns the way libraries do: Python's stdout, a warning, and a write to file descriptor 2."""
    import os
    import warnings

    print("noise on stdout")
    warnings.warn("noise as a warning")
    os.write(2, b"noise on file descriptor 2\n")
    return by_length(prompts, responses)


def slow_by_length(prompts, responses):
    """by_length, a second per batch: long enough for a test to kill the process judging it."""
    import time

    time.sleep(1.0)
    return by_length(prompts, responses)
