"""One process pool for per-image work (superpixels, seeds, evaluation, COCO conversion).

The processes are spawned, not forked: a fork after MXNet's engine threads have started can
leave the workers deadlocked. So `func` (and `initializer`) must be picklable: a module-level
function or a functools.partial of one.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Callable, Iterator, Mapping, Optional, Sequence, TypeVar

from tqdm import tqdm

T = TypeVar("T")
U = TypeVar("U")


def map_images(func: Callable[[U], T], items: Sequence[U], workers: int, desc: str,
               initializer: Optional[Callable[..., None]] = None, initargs: tuple = (),
               ordered: bool = False, env: Optional[Mapping[str, str]] = None) -> Iterator[T]:
    """Yield func(item) for every item (image names, or any picklable per-image items) with a
    progress bar; in a pool of `workers` spawned processes when workers > 1 (results in the
    items' order when `ordered`, else as they finish), in this process otherwise. `initializer`
    (initargs) runs once in each process that calls `func`. `env`: environment variables of the
    spawned processes (read by libraries as they load, e.g. OMP_NUM_THREADS; not this process's).
    An error in func propagates and stops the pool."""
    with tqdm(total=len(items), desc=desc, unit="img") as progress:
        if workers <= 1 or len(items) <= 1:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                yield func(item)
                progress.update()
            return
        context = multiprocessing.get_context("spawn")
        with _environment(env or {}):   # the pool spawns its processes as it is made
            pool = context.Pool(min(workers, len(items)), initializer=initializer,
                                initargs=initargs)
        with pool:
            results = pool.imap(func, items) if ordered else \
                pool.imap_unordered(func, items, chunksize=4)
            for result in results:
                yield result
                progress.update()


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `env` over it inside the block, as it was after."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
