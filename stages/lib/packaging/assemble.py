"""Assemble one target's device package from its build folders (see ``layout`` for the format).

    from stages.lib.packaging import BuildFolders, assemble
    res = assemble(out_dir, BuildFolders(engine=..., quantize=..., checkpoint=..., reference=...,
                                         verify=...), name="default")
    res.tar, res.manifest, res.doc["files"]

Every file is read twice at most (once for its digest, once into the tar), never whole into
memory; the JSON documents are built in memory. Nothing under the input folders is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.packaging import describe, layout, sources
from stages.lib.packaging.archive import Member, file_digest, write_tar
from stages.lib.parity.metrics import export_noise

Report = Callable[[str, float | None], None]


@dataclass(frozen=True)
class Assembled:
    """What ``assemble`` wrote: the tar and the manifest (also inside the tar, same bytes)."""

    tar: Path
    manifest: Path
    doc: dict[str, Any]  # the manifest's content
    sha256: str  # of the tar
    bytes: int  # of the tar
    notes: list[str] = field(default_factory=list)


def _quiet(message: str, fraction: float | None = None) -> None:
    pass


def _target(given: Mapping[str, Any] | None, cars: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    car = cars["vision"]
    built_for = {str(c.get("target")) for c in cars.values()}
    if given is not None and built_for != {str(given["name"])}:
        raise StageError(f"the engines were built for {', '.join(sorted(built_for))}, not {given['name']}")
    versions = {str(c.get("builder_version")) for c in cars.values()}
    if len(versions) != 1:
        raise StageError(f"the engines were built by different builder versions: {sorted(versions)}")
    src = given if given is not None else {"name": car.get("target"), "sm": car.get("sm"), "builder": car.get("builder")}
    return {"name": src["name"], "sm": src["sm"], "builder": src["builder"], "builder_version": versions.pop()}


def members(folders: sources.BuildFolders, *, name: str, target: Mapping[str, Any] | None = None,
            gates: Mapping[str, Mapping[str, Any]] | None = None, include_onnx: bool = True,
            config_digest: str = "", report: Report = _quiet) -> tuple[str, list[Member], dict[str, Any], list[str]]:
    """(top folder, every member including manifest.json, the manifest, notes) of the package."""
    graphs = sources.built_graphs(folders.engine)
    cars = sources.sidecars(folders.engine, graphs)
    tgt = _target(target, cars)
    compat, notes = sources.package_compat(cars)
    prec = sources.precisions(folders.quantize, cars)
    specs = sources.io_specs(folders.quantize, graphs)
    ckpt, family = sources.checkpoint_path(folders.checkpoint)
    npz, reference = sources.reference_files(folders.reference)
    parity = sources.verify_doc(folders.verify)

    with_onnx = include_onnx or compat["weight_stripped"]
    if compat["weight_stripped"]:
        notes.append("weight-stripped engines: refit them from onnx/ before use (included whatever "
                     "package.onnx says)")
    elif not include_onnx:
        notes.append("onnx/ left out (package.onnx: false)")
    if parity is None:
        notes.append("no verify.json: the package carries no parity figures")

    out: list[Member] = []
    for g in graphs:
        out += [Member(rel, source=folders.engine / Path(rel).name) for rel in layout.engine_files(g)]
    if with_onnx:
        out += [Member(f"{layout.ONNX_DIR}/{f.name}", source=f) for f in sources.onnx_files(folders.quantize, graphs)]
    out += [Member(f"{layout.TOKENIZER_DIR}/{f.name}", source=f) for f in sources.tokenizer_files(ckpt)]
    out.append(Member(layout.PROBE_NPZ, source=npz))
    noise = export_noise(folders.quantize)  # what a decisive position must clear, as verify measured it
    out.append(Member(layout.PROBE_JSON, data=describe.dump(describe.probe_doc(npz, reference, prec, gates or {}, noise))))
    out.append(Member(layout.RUNTIME, data=describe.dump(describe.runtime_doc(family, specs, ckpt))))

    files: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(out):
        report(f"digest {m.path}", i / (2 * len(out)))
        files[m.path] = file_digest(m)
    for g in graphs:
        want = cars[g].get("sha256")
        if want and files[f"{layout.ENGINES_DIR}/{g}.engine"]["sha256"] != want:
            raise StageError(f"{folders.engine / (g + '.engine')}: sha256 differs from its sidecar's (damaged engine?)")

    from pipeline import __version__

    doc = describe.manifest_doc(
        name=name, family=family, config_digest=config_digest, target=tgt, compat=compat,
        precision=prec, graphs=graphs,
        # refit_source: the engines are weight-stripped and onnx/ holds the weights to refit them with
        onnx={"included": with_onnx, "refit_source": compat["weight_stripped"]},
        files=files, parity=parity, notes=notes, created_by=f"vlmforge {__version__}")
    out.append(Member(layout.MANIFEST, data=describe.dump(doc)))
    return layout.top_folder(name, str(tgt["name"])), out, doc, notes


def assemble(out_dir: str | Path, folders: sources.BuildFolders | Mapping[str, Path], *, name: str,
             target: Mapping[str, Any] | None = None, gates: Mapping[str, Mapping[str, Any]] | None = None,
             include_onnx: bool = True, config_digest: str = "", report: Report = _quiet) -> Assembled:
    """Write ``package.tar`` and ``manifest.json`` into ``out_dir`` (which must exist).

    ``folders``: the build's output folders (a ``BuildFolders`` or a stage's ``ctx.inputs``);
    ``name``: the config name (top folder ``<name>-<target>``); ``target``: the catalog entry
    (``name``, ``sm``, ``builder``; default: what the engine sidecars say); ``gates``:
    precision -> gate (``cfg.gates``), recorded in probe.json per graph; ``include_onnx``: ship
    onnx/ (forced on for weight-stripped engines); ``config_digest``: recorded as is.
    """
    out_dir = Path(out_dir)
    f = folders if isinstance(folders, sources.BuildFolders) else sources.BuildFolders.from_inputs(folders)
    top, mems, doc, notes = members(f, name=name, target=target, gates=gates, include_onnx=include_onnx,
                                    config_digest=config_digest, report=report)
    report("writing package.tar", 0.5)
    tar = out_dir / layout.TAR_NAME
    written = write_tar(tar, top, mems)
    manifest = out_dir / layout.MANIFEST
    manifest_member = next(m for m in mems if m.path == layout.MANIFEST)
    assert manifest_member.data is not None
    manifest.write_bytes(manifest_member.data)
    return Assembled(tar=tar, manifest=manifest, doc=doc, sha256=written["sha256"], bytes=written["bytes"],
                     notes=notes)
