"""What tests/test_parsing.py has a parsing process run: module functions (they pickle by
name), in a module that imports nothing heavy, so a process starts in a fifth of a second."""

import os
import time


def process_id(body: bytes) -> int:
    return os.getpid()


def forever(body: bytes) -> None:
    while True:
        pass


def die(body: bytes) -> None:
    os._exit(3)


def hoard(body: bytes) -> bytes:
    return bytes(3 << 30)  # past MEMORY_LIMIT


def sleep_long(body: bytes) -> None:
    time.sleep(120)
