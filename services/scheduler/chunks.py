"""A step's batch cut into StreamBatch chunks bounded by serialized bytes and by group count.

Groups go out whole and in plan order. A chunk closes before the next group
would take its serialized size past `max_bytes`, or once it holds
`max_groups`; a group bigger than `max_bytes` travels alone. The validation
summary rides in the first chunk and the failed tasks in the last (where
the trainer reads them); when the failed tasks do not fit beside the last
groups they get a last chunk of their own. A chunk that would exceed the
server's gRPC message limit even alone is refused with TooLarge, naming its
task and question, before anything is sent.
"""

from __future__ import annotations

from typing import Iterator

from e3.contracts import e3_pb2 as pb

DEFAULT_MAX_CHUNK_BYTES = 4 * 1024 * 1024  # BatchRequest.max_chunk_bytes = 0
DEFAULT_MAX_GROUPS_PER_CHUNK = 64  # BatchRequest.max_groups_per_chunk = 0


class TooLarge(ValueError):
    """A group (or the failed-task list) is bigger than one gRPC message may be."""


def _field_bytes(size: int) -> int:
    """Bytes a length-delimited field of `size` bytes takes in its parent: tag, length, body."""
    return 1 + _varint_len(size) + size


def _varint_len(value: int) -> int:
    length = 1
    while value >= 0x80:
        value >>= 7
        length += 1
    return length


def batch_chunks(batch: dict, max_bytes: int, max_groups: int, max_message_bytes: int) -> Iterator[pb.BatchChunk]:
    """The chunks of `batch` (engine.wait_for_batch's dict), in order; the last has last=True.

    Every cut is decided (and TooLarge raised) before the first chunk is yielded.
    """
    cuts = _cut(batch, max_bytes, max_groups, max_message_bytes)
    return _chunks(*cuts)


def _cut(batch: dict, max_bytes: int, max_groups: int, max_message_bytes: int):
    """(header maker, the pb groups, the group indices of each chunk, the failed tasks)."""
    groups = [
        pb.Group(task_id=g["task_id"], question_id=g["question_id"], temperature=g["temperature"],
                 policy_version=g["policy_version"], level=g.get("level", 0), replica_id=g.get("replica_id", ""),
                 samples=[pb.Sample(**s) for s in g["samples"]])
        for g in batch["groups"]
    ]
    failed = [pb.FailedTask(**f) for f in batch.get("failed_tasks", [])]
    validation = batch.get("validation", {})

    def header(first: bool) -> pb.BatchChunk:
        return pb.BatchChunk(step=batch["step"], policy_version=batch["policy_version"],
                             temperature=batch["temperature"], total_groups=len(groups),
                             validation=validation if first else {})

    # + 2: last=True (tag and value). The first chunk's header also carries the validation summary.
    first_header, header_size = header(True).ByteSize() + 2, header(False).ByteSize() + 2
    parts: list[list[int]] = []
    current: list[int] = []
    size = first_header
    for i, group in enumerate(groups):
        n = _field_bytes(group.ByteSize())
        if first_header + n > max_message_bytes:
            raise TooLarge(f"the group of task {group.task_id} (question {group.question_id}, "
                           f"{sum(len(s.response_token_ids) for s in group.samples)} response tokens) takes "
                           f"{n} bytes serialized, more than the scheduler's gRPC message limit of "
                           f"{max_message_bytes} bytes; it cannot be streamed")
        if current and (size + n > max_bytes or len(current) >= max_groups):
            parts.append(current)
            current, size = [], header_size
        current.append(i)
        size += n
    failed_bytes = sum(_field_bytes(f.ByteSize()) for f in failed)
    if failed and current and size + failed_bytes > max_bytes:
        parts.append(current)
        current, size = [], header_size
    if failed and first_header + failed_bytes > max_message_bytes:
        raise TooLarge(f"the {len(failed)} failed tasks of step {batch['step']} take {failed_bytes} bytes "
                       f"serialized, more than the scheduler's gRPC message limit of {max_message_bytes} bytes")
    parts.append(current)  # empty only for a batch without groups, or a last chunk of failed tasks alone
    return header, groups, parts, failed


def _chunks(header, groups: list, parts: list[list[int]], failed: list) -> Iterator[pb.BatchChunk]:
    for index, part in enumerate(parts):
        chunk = header(index == 0)
        chunk.groups.extend(groups[i] for i in part)
        for i in part:
            groups[i] = None  # the chunk holds its copy; keep one copy of the batch, not two
        if index == len(parts) - 1:
            chunk.last = True
            chunk.failed_tasks.extend(failed)
        yield chunk
