"""fedpipe inside any Flower app: a client mod (`fedpipe_mod`) and a strategy wrapper
(`compress`) that agree through the codec settings the wrapper announces (`spec`)."""

from fedpipe.flower.mod import AppReplyError, fedpipe_mod
from fedpipe.flower.spec import announce, announced
from fedpipe.flower.wrap import compress

__all__ = ["AppReplyError", "announce", "announced", "compress", "fedpipe_mod"]
