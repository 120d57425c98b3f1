"""Units of the OCI backend: deterministic layers, the shared wheel installer, the registry
client's parsing, the epoch, and the reproducibility diff. The real images are tested in
tests/image/test_oci.py."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from packager.errors import PushError, UsageError
from packager.image import assemble, bases, blobs, export, wheelinstall
from packager.image.layers import LAYER_MEDIA_TYPE, Entry, entries_from_tree, write_layer
from packager.image.registry import _base_url, parse_target
from tests.fixtures.wheelmaker import build_wheel


def _tree(root: Path, umask: int) -> Path:
    old = os.umask(umask)
    try:
        (root / "pkg" / "sub").mkdir(parents=True)
        (root / "pkg" / "b.py").write_text("b = 2\n")
        (root / "pkg" / "a.py").write_text("a = 1\n")
        (root / "pkg" / "sub" / "tool").write_text("#!/bin/sh\n")
        (root / "pkg" / "sub" / "tool").chmod(0o700)
        (root / "pkg" / "link").symlink_to("a.py")
    finally:
        os.umask(old)
    return root


def test_layers_do_not_depend_on_umask_order_or_mtime(tmp_path: Path) -> None:
    one = _tree(tmp_path / "one", 0o022)
    two = _tree(tmp_path / "two", 0o077)
    os.utime(two / "pkg" / "a.py", (1, 1))
    a = write_layer(entries_from_tree(one, "/opt/x"), tmp_path / "a.tar", epoch=42, comment="")
    b = write_layer(
        reversed(entries_from_tree(two, "/opt/x")), tmp_path / "b.tar", epoch=42, comment=""
    )
    assert a.digest == b.digest
    assert a.digest == "sha256:" + hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members)
    assert "opt" in members  # parents are present
    assert members["opt/x/pkg/a.py"].mode == 0o644
    assert members["opt/x/pkg/sub/tool"].mode == 0o755
    assert members["opt/x/pkg/sub"].mode == 0o755
    assert members["opt/x/pkg/link"].linkname == "a.py"
    assert {m.mtime for m in members.values()} == {42}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}
    other = write_layer(entries_from_tree(one, "/opt/x"), tmp_path / "c.tar", epoch=43, comment="")
    assert other.digest != a.digest


def test_an_interrupted_layer_leaves_nothing(tmp_path: Path) -> None:
    def entries() -> list[Entry]:
        return [Entry(path="/a", content=b"x"), Entry(path="/b", source=tmp_path / "missing")]

    with pytest.raises(FileNotFoundError):
        write_layer(entries(), tmp_path / "layer.tar", epoch=0, comment="")
    assert list(tmp_path.iterdir()) == []


def _wheelhouse(tmp_path: Path) -> tuple[Path, Path, Path]:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = build_wheel(wheels, "demopkg", "1.0", {"demopkg/__init__.py": "X = 1\n"})
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"demopkg==1.0 \\\n    --hash=sha256:{digest}\n    # via test\n")
    manifest = tmp_path / "wheelhouse.txt"
    manifest.write_text(f"# header\n{digest} demopkg 1.0 {wheel.name}\n")
    return wheels, manifest, lock


def test_wheelinstall_writes_a_venv_tree(tmp_path: Path) -> None:
    wheels, manifest, lock = _wheelhouse(tmp_path)
    root = tmp_path / "root"
    count = wheelinstall.install(
        wheels=wheels,
        manifest=manifest,
        lock=lock,
        venv="/opt/venv",
        python="3.11",
        base_python="/usr/bin/python3.11",
        root=root,
    )
    assert count == 1
    venv = root / "opt" / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    assert (site / "demopkg" / "__init__.py").read_text() == "X = 1\n"
    assert (site / "demopkg-1.0.dist-info" / "INSTALLER").read_bytes() == b"packager"
    assert str((venv / "bin" / "python").readlink()) == "/usr/bin/python3.11"
    assert "home = /usr/bin\n" in (venv / "pyvenv.cfg").read_text()
    assert not list(root.rglob("*.pyc"))


def test_wheelinstall_refuses_a_wheel_the_lock_does_not_allow(tmp_path: Path) -> None:
    wheels, manifest, lock = _wheelhouse(tmp_path)
    lock.write_text("demopkg==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(wheelinstall.InstallError, match="not one the lock allows"):
        wheelinstall.check_wheelhouse(wheels, manifest, lock)


def test_wheelinstall_refuses_a_changed_or_unlisted_wheel(tmp_path: Path) -> None:
    wheels, manifest, lock = _wheelhouse(tmp_path)
    (wheels / "extra-1.0-py3-none-any.whl").write_bytes(b"zip")
    with pytest.raises(wheelinstall.InstallError, match="not in the manifest"):
        wheelinstall.check_wheelhouse(wheels, manifest, lock)
    (wheels / "extra-1.0-py3-none-any.whl").unlink()
    wheel = next(wheels.glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock.write_text(lock.read_text() + f"    --hash=sha256:{digest}\n")
    with pytest.raises(wheelinstall.InstallError, match="does not match its sha256"):
        wheelinstall.check_wheelhouse(wheels, manifest, lock)


def test_wheelinstall_accepts_a_wheel_built_from_the_locked_sdist(tmp_path: Path) -> None:
    wheels, manifest, lock = _wheelhouse(tmp_path)
    lock.write_text("demopkg==1.0 \\\n    --hash=sha256:" + "1" * 64 + "\n")  # the sdist's
    manifest.write_text(manifest.read_text().rstrip("\n") + " built\n")
    assert len(wheelinstall.check_wheelhouse(wheels, manifest, lock)) == 1


@pytest.mark.parametrize(
    ("reference", "registry", "repository", "tag"),
    [
        ("127.0.0.1:5000/wine:3", "127.0.0.1:5000", "wine", "3"),
        ("localhost/team/wine", "localhost", "team/wine", "latest"),
        ("registry.example.com/a/b:v1", "registry.example.com", "a/b", "v1"),
    ],
)
def test_push_targets(reference: str, registry: str, repository: str, tag: str) -> None:
    target = parse_target(reference)
    assert (target.registry, target.repository, target.tag) == (registry, repository, tag)


def test_a_push_target_must_name_a_registry() -> None:
    with pytest.raises(PushError, match="names no registry"):
        parse_target("wine:3")


def test_only_loopback_registries_use_plain_http() -> None:
    assert _base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert _base_url("localhost:5000") == "http://localhost:5000"
    assert _base_url("registry.example.com") == "https://registry.example.com"
    assert _base_url("127.0.0.1.example.com") == "https://127.0.0.1.example.com"


def test_iso_time_is_utc_whatever_the_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Pacific/Chatham")
    assert assemble.iso_time(0) == "1970-01-01T00:00:00Z"


def _store_with_layer(root: Path, files: dict[str, bytes]) -> tuple[blobs.BlobStore, str]:
    store = blobs.BlobStore(root)
    layer = write_layer(
        [Entry(path=p, content=c) for p, c in files.items()],
        store.tmp / "l.tar",
        epoch=0,
        comment="files",
    )
    store.put_file(layer.path, layer.digest)
    config = {"history": [{"comment": "the model"}], "rootfs": {"diff_ids": [layer.digest]}}
    config_digest = store.put_bytes(blobs.canonical_json(config))
    manifest = {"config": {"digest": config_digest}, "layers": [{"digest": layer.digest}]}
    return store, store.put_bytes(blobs.canonical_json(manifest))


def test_first_difference_names_the_layer_and_file(tmp_path: Path) -> None:
    a, digest_a = _store_with_layer(tmp_path / "a", {"/opt/m/x": b"1", "/opt/m/y": b"2"})
    b, digest_b = _store_with_layer(tmp_path / "b", {"/opt/m/x": b"1", "/opt/m/y": b"3"})
    found = export.first_difference(a, b, digest_a, digest_b)
    assert found == "layer 1 (the model): /opt/m/y differs"


def test_docker_archive_is_deterministic(tmp_path: Path) -> None:
    store, _ = _store_with_layer(tmp_path / "s", {"/a": b"a"})
    layer_digest = next("sha256:" + p.name for p in store.blobs.iterdir() if tarfile.is_tarfile(p))
    config = blobs.canonical_json({"rootfs": {"diff_ids": [layer_digest]}})
    image = assemble.OciImage(
        manifest=b"{}",
        manifest_digest=store.put_bytes(b"{}"),
        config_digest=store.put_bytes(config),
        layers=((LAYER_MEDIA_TYPE, layer_digest, store.path(layer_digest).stat().st_size),),
        written=0,
        store=store,
    )
    export.write_docker_archive(image, tmp_path / "one.tar", tag="x:1", epoch=5)
    export.write_docker_archive(image, tmp_path / "two.tar", tag="x:1", epoch=5)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tar:
        names = tar.getnames()
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        assert b'"RepoTags":["x:1"]' in io.BytesIO(manifest.read()).read()
    assert {"oci-layout", "index.json", "manifest.json"} <= set(names)


def test_a_base_from_an_oci_layout(tmp_path: Path) -> None:
    store = blobs.BlobStore(tmp_path / "store")
    layer = write_layer(
        [Entry(path="/usr/bin/python3.11", content=b"\x7fELF", executable=True)],
        store.tmp / "l.tar",
        epoch=0,
        comment="",
    )
    store.put_file(layer.path, layer.digest)
    config_digest = store.put_bytes(
        blobs.canonical_json(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/usr/local/bin:/usr/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
            }
        )
    )
    descriptor = {"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}
    manifest = blobs.canonical_json({"config": {"digest": config_digest}, "layers": [descriptor]})
    image = assemble.OciImage(
        manifest=manifest,
        manifest_digest=store.put_bytes(manifest),
        config_digest=config_digest,
        layers=((LAYER_MEDIA_TYPE, layer.digest, layer.size),),
        written=0,
        store=store,
    )
    export.write_layout(image, tmp_path / "layout", tag="base")
    other = blobs.BlobStore(tmp_path / "other")
    base = bases.load_base(
        f"oci:{tmp_path / 'layout'}:base", other, client_factory=lambda: pytest.fail("engine")
    )
    assert [b.digest for b in base.layers] == [layer.digest]
    assert other.has(layer.digest)
    assert base.digest == image.manifest_digest
    assert bases.base_python(base, "3.11") == "/usr/bin/python3.11"
    with pytest.raises(UsageError, match=r"no python3\.12"):
        bases.base_python(base, "3.12")


def test_transformers_weights_and_components_get_layers_of_their_own(tmp_path: Path) -> None:
    from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model
    from tests.unit.test_trust import _plan

    mlmodel = {
        "flavors": {
            "python_function": {"loader_module": "mlflow.transformers", "python_version": "3.11.7"},
            "transformers": {
                "model_binary": "model",
                "components": ["tokenizer"],
                "transformers_version": "4.57.0",
            },
        }
    }
    files: dict[str, str | bytes] = {
        "model/config.json": "{}",
        "model/model.safetensors": b"\0" * 16,
        "components/tokenizer/tokenizer.json": "{}",
        "components/tokenizer/tokenizer_config.json": "{}",
        "modelcard.md": "card",
    }
    plan, _ = _plan(write_model(tmp_path / "model", mlmodel, files))
    groups = {
        comment: sorted(e.path for e in entries)
        for _, comment, entries in assemble._plan_groups(plan)
    }
    assert groups["/opt/model/model: the flavor's model"] == [
        "/opt/model/model/config.json",
        "/opt/model/model/model.safetensors",
    ]
    assert groups["/opt/model/components/tokenizer: the flavor's components/tokenizer"] == [
        "/opt/model/components/tokenizer/tokenizer.json",
        "/opt/model/components/tokenizer/tokenizer_config.json",
    ]
    rest = groups["/opt/model: MLmodel, environment and weights"]
    assert {"/opt/model/MLmodel", "/opt/model/modelcard.md"} <= set(rest)
    assert not any(p.startswith(("/opt/model/model/", "/opt/model/components/")) for p in rest)
    # Other flavors keep one model layer: a pickled model's file is not split off.
    sk_plan, _ = _plan(write_model(tmp_path / "sk", PYFUNC_SKLEARN))
    assert [k for k, _, _ in assemble._plan_groups(sk_plan)].count("directory") == 0
