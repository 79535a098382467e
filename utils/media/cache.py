"""Decoded images kept by a hash of their bytes, so that an image sent again (as a
conversation does every turn) is not decoded again."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class DecodedImageCache:
    """Decoded images by a hash of their bytes and pixel budget, the least recently
    used dropped first once they take more than `max_bytes`.

    A conversation sends its images again with every turn, and decoding one costs far
    more than hashing its bytes (a 112x112 PNG: about 0.3 ms against 0.04 ms). The
    arrays are shared by every request that sends the same image, so they are
    read-only. Thread-safe: large images are decoded in worker threads.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._images: OrderedDict[tuple[bytes, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: bytes, max_pixels: int) -> tuple[bytes, int]:
        # A cryptographic hash: nobody can make their image collide with someone else's.
        return hashlib.blake2b(data, digest_size=16).digest(), max_pixels

    def get(self, key: tuple[bytes, int]) -> np.ndarray | None:
        with self._lock:
            image = self._images.get(key)
            if image is None:
                self.misses += 1
                return None
            self._images.move_to_end(key)
            self.hits += 1
            return image

    def put(self, key: tuple[bytes, int], image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes:
            return
        image.setflags(write=False)
        with self._lock:
            old = self._images.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._images[key] = image
            self.bytes += image.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self.bytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._images)
