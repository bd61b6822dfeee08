"""The file registry, written so a reader never sees half of it.

Feast's `FileRegistryStore` rewrites the registry file in place (truncate, then write). A feature
server or a `get_online_features` call that refreshes its registry cache during that write reads a
truncated file: an empty registry, so `FeatureViewNotFoundException` for every view, until the
next refresh. Every commit (`feast apply`, each step of `materialize`) goes through this write.

`AtomicFileRegistryStore` writes the new registry to a temp file beside the old one, flushes it
to disk and renames it over the old one (`os.replace`, atomic on POSIX): a reader opens either the
whole old registry or the whole new one, and a writer killed mid-write leaves the old one intact
(and a `.<name>.<pid>.tmp` file that `llm4es publish` removes). The feature_store yaml files name
it in `registry.registry_store_type`. Only the standard library and Feast are imported.
"""
from __future__ import annotations

import os
import uuid

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.utils import _utc_now


class AtomicFileRegistryStore(FileRegistryStore):
    """A `FileRegistryStore` whose writes replace the file in one rename."""

    def _write_registry(self, registry_proto: RegistryProto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        target = self._filepath
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, mode="wb", buffering=0) as f:
                f.write(registry_proto.SerializeToString())
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
