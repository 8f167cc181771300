"""Device packages: one archive per target with everything a device needs (format: ``layout``).

Modules, one job each: ``layout`` (the format: names, modes, FORMAT_VERSION), ``sources``
(reading the build folders a package is made of), ``describe`` (runtime.json, probe.json,
manifest.json), ``archive`` (deterministic tar writing, the reader's checks), ``assemble``
(one call: build folders in, package.tar + manifest.json out).
"""

from stages.lib.packaging.archive import Member, check_archive, read_member, write_tar
from stages.lib.packaging.assemble import Assembled, assemble, members
from stages.lib.packaging.describe import digest_params
from stages.lib.packaging.layout import FORMAT_VERSION, MANIFEST, TAR_NAME, top_folder
from stages.lib.packaging.sources import BuildFolders
from stages.lib.reference_io import load_samples as load_probe  # a probe.npz is a reference.npz

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "TAR_NAME",
    "Assembled",
    "BuildFolders",
    "Member",
    "assemble",
    "check_archive",
    "digest_params",
    "load_probe",
    "members",
    "read_member",
    "top_folder",
    "write_tar",
]
