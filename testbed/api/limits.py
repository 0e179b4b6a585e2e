"""How big writes may be: one object, one batch of writes, one gRPC message.

The API server and its clients share these numbers. An object is refused, with
its name, above Kubernetes' limit on a request body; the client packs writes
into batches that stay under gRPC's message limit, which the server enforces.
"""

from __future__ import annotations

from testbed.api.errors import TooLarge, plain
from testbed.api.kinds import kind_of, unwrap
from testbed.api.v1 import api_pb2 as pb

#: One gRPC message the server accepts (gRPC's default, set explicitly).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: One write, as its encoded WriteOp: kube-apiserver's limit on a request body.
MAX_OBJECT_BYTES = 3 * 1024 * 1024
#: The writes of one WriteBatchRequest together, with room for the message's own framing.
MAX_BATCH_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
#: What an op adds to a batch besides its own bytes: its field tag and length prefix.
OP_FRAMING_BYTES = 6


def too_large(op: pb.WriteOp) -> TooLarge:
    """The refusal of a write over MAX_OBJECT_BYTES, naming its object."""
    which = op.WhichOneof("op")
    if which in ("create", "update"):
        obj = unwrap(getattr(op, which).object)
        what = f'{kind_of(obj).name} "{plain(obj.metadata.name)}"'
    else:
        what = f'{plain(op.delete.key.kind)} "{plain(op.delete.key.name)}"'
    return TooLarge(f"{what}: Request entity too large: limit is {MAX_OBJECT_BYTES}")


def check_size(op: pb.WriteOp) -> int:
    """The op's encoded size; TooLarge if it is over the limit."""
    size = op.ByteSize()
    if size > MAX_OBJECT_BYTES:
        raise too_large(op)
    return size
