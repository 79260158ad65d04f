"""The logit store: format v1, codecs, writer and reader (see format.py for the layout)."""

from distill_pipe.store.codecs import CODEC_NAMES, Codec, Head, head_from_model, make_codec
from distill_pipe.store.format import (FORMAT_NAME, FORMAT_VERSION, HeadCorruptError, NotAStoreError,
                                       StoreCorruptError, StoreError, StoreIncompleteError, StoreVersionError)
from distill_pipe.store.reader import LogitStore, TeacherBatch, open_store
from distill_pipe.store.writer import ShardWriter, create_store, write_shard

__all__ = [
    "CODEC_NAMES", "Codec", "FORMAT_NAME", "FORMAT_VERSION", "Head", "HeadCorruptError", "LogitStore", "NotAStoreError",
    "ShardWriter", "StoreCorruptError", "StoreError", "StoreIncompleteError", "StoreVersionError",
    "TeacherBatch", "create_store", "head_from_model", "make_codec", "open_store", "write_shard",
]
