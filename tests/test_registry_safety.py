"""A registry row cannot be turned into code execution.

Each test plants what an attacker who can edit the published copy (the file BI
users receive, and the one `churn serve` reads the registry from) or the models
folder could plant: a rewritten hash, an artifact_dir outside the models folder,
a swapped or forged artifact. The planted model file is a pickle whose
unpickling would create a marker file; every test proves the marker never
appears and the error names what was refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.modeling.registry import (
    KEY_ENV_VAR,
    KEY_FILE,
    LEGACY_PIPELINE_FILE,
    MANIFEST_FILE,
    PIPELINE_FILE,
    REGISTRY,
    RegistryError,
    load_model,
    register,
    sha256_file,
)
from ml.warehouse import connect
from tests.conftest import make_config
from tests.test_registry import fitted_model
from tests.test_train import synthetic_mart


@pytest.fixture
def config(tmp_path: Path) -> ChurnConfig:
    config = make_config(tmp_path / "wh")
    with connect(config.warehouse.build_db) as session:
        session.append(config.dataset.feature_mart, synthetic_mart())
    return config


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_WritesMarker(marker)))


def test_the_planted_pickle_really_runs_code(tmp_path: Path) -> None:
    """Control: the plant used below does execute when unpickled, so its absence later means something."""
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "evil.pkl", marker)
    pickle.loads((tmp_path / "evil.pkl").read_bytes()).close()
    assert marker.exists()


def _published_copy(config: ChurnConfig) -> Path:
    shutil.copy(config.warehouse.build_db, config.warehouse.published_db)
    return config.warehouse.published_db


def _set_row(db: Path, version: str, **values: str) -> None:
    assignments = ", ".join(f"{name} = ?" for name in values)
    with connect(db) as session:
        session.execute(f"update {REGISTRY.name} set {assignments} where model_version = ?",
                        [*values.values(), version])


def _evil_folder(tmp_path: Path, marker: Path) -> tuple[Path, str]:
    """A folder holding a marker-writing model.joblib and the hashes a forger would record for it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    plant_pickle(evil / LEGACY_PIPELINE_FILE, marker)
    (evil / "metadata.json").write_text(json.dumps({"algorithm": "logistic_regression"}))
    hashes = {name: sha256_file(evil / name) for name in (LEGACY_PIPELINE_FILE, "metadata.json")}
    return evil, json.dumps(hashes, sort_keys=True)


def test_tampered_hash_in_the_published_registry_is_refused(config: ChurnConfig, tmp_path: Path) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    folder = config.warehouse.models_dir / version
    marker = tmp_path / "pwned"
    plant_pickle(folder / PIPELINE_FILE, marker)  # the file swapped, its new hash written into BI's copy
    published = _published_copy(config)
    hashes = {**_row_hashes(published, version), PIPELINE_FILE: sha256_file(folder / PIPELINE_FILE)}
    _set_row(published, version, artifact_sha256=json.dumps(hashes, sort_keys=True))
    with pytest.raises(RegistryError, match="tampered"):
        load_model(config, version, registry_db=published)
    assert not marker.exists()


def _row_hashes(db: Path, version: str) -> dict[str, str]:
    with connect(db, read_only=True) as session:
        return json.loads(session.scalar(
            f"select artifact_sha256 from {REGISTRY.name} where model_version = ?", [version]))


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_artifact_dir_outside_the_models_folder_is_refused(config: ChurnConfig, tmp_path: Path, where: str) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    marker = tmp_path / "pwned"
    evil, hashes = _evil_folder(tmp_path, marker)
    artifact_dir = str(evil) if where == "absolute" else os.path.relpath(evil, config.warehouse.models_dir)
    assert (where == "dotdot") == artifact_dir.startswith("..")
    for db in (config.warehouse.build_db, _published_copy(config)):
        _set_row(db, version, artifact_dir=artifact_dir, artifact_sha256=hashes)
        with pytest.raises(RegistryError, match="refus"):
            load_model(config, version, registry_db=db)
    assert not marker.exists()


def test_symlink_out_of_the_models_folder_is_refused(config: ChurnConfig, tmp_path: Path) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    marker = tmp_path / "pwned"
    evil, hashes = _evil_folder(tmp_path, marker)
    (config.warehouse.models_dir / "innocent").symlink_to(evil)
    _set_row(config.warehouse.build_db, version, artifact_dir="innocent", artifact_sha256=hashes)
    with pytest.raises(RegistryError, match="outside"):
        load_model(config, version)
    assert not marker.exists()


def test_swapped_artifact_file_is_refused_before_loading(config: ChurnConfig, tmp_path: Path) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    marker = tmp_path / "pwned"
    path = config.warehouse.models_dir / version / PIPELINE_FILE
    plant_pickle(path, marker)
    with pytest.raises(RegistryError, match=f"{path}.*changed after registration"):
        load_model(config, version)
    assert not marker.exists()


def test_forged_manifest_fails_its_signature(config: ChurnConfig, tmp_path: Path) -> None:
    """Swap the file AND rewrite the manifest and both registries' hashes: only the key can sign."""
    version = register(config, fitted_model(), "r1", {}).version
    folder = config.warehouse.models_dir / version
    marker = tmp_path / "pwned"
    plant_pickle(folder / PIPELINE_FILE, marker)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][PIPELINE_FILE] = sha256_file(folder / PIPELINE_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    for db in (config.warehouse.build_db, _published_copy(config)):
        _set_row(db, version, artifact_sha256=json.dumps(manifest["files"], sort_keys=True))
        with pytest.raises(RegistryError, match="signature"):
            load_model(config, version, registry_db=db)
    assert not marker.exists()


def test_another_models_signed_folder_is_refused(config: ChurnConfig) -> None:
    first = register(config, fitted_model(), "r1", {}).version
    second = register(config, fitted_model(seed=3), "r2", {}).version
    _set_row(config.warehouse.build_db, second, artifact_dir=first,
             artifact_sha256=json.dumps(_row_hashes(config.warehouse.build_db, first), sort_keys=True))
    with pytest.raises(RegistryError, match=f"signed manifest of model {first}"):
        load_model(config, second)


def test_unsigned_pickle_is_never_loaded_from_the_published_copy(config: ChurnConfig, tmp_path: Path) -> None:
    """Migration rule: an unsigned (pre-signing) model is trusted only through the build registry."""
    version = register(config, fitted_model(), "r1", {}).version
    folder = config.warehouse.models_dir / version
    marker = tmp_path / "pwned"
    (folder / MANIFEST_FILE).unlink()
    (folder / PIPELINE_FILE).unlink()
    plant_pickle(folder / LEGACY_PIPELINE_FILE, marker)
    published = _published_copy(config)
    hashes = {**_row_hashes(published, version), LEGACY_PIPELINE_FILE: sha256_file(folder / LEGACY_PIPELINE_FILE)}
    hashes.pop(PIPELINE_FILE)
    _set_row(published, version, artifact_sha256=json.dumps(hashes, sort_keys=True))
    with pytest.raises(RegistryError, match="no signed manifest"):
        load_model(config, version, registry_db=published)
    with pytest.raises(RegistryError, match="changed after registration|missing"):
        load_model(config, version)  # the build registry's hashes are of the real files
    assert not marker.exists()


def test_skops_file_with_a_type_outside_the_allow_list_is_refused(config: ChurnConfig) -> None:
    """Even a correctly signed model file may only construct allow-listed types."""
    import skops.io

    from ml.modeling.registry import signing_key, write_manifest

    version = register(config, fitted_model(), "r1", {}).version
    folder = config.warehouse.models_dir / version
    skops.io.dump({"preprocess": None, "estimator": None, "calibrator": _WritesMarker(folder / "x")},
                  folder / PIPELINE_FILE)
    hashes = {**_row_hashes(config.warehouse.build_db, version), PIPELINE_FILE: sha256_file(folder / PIPELINE_FILE)}
    write_manifest(folder, version, hashes, signing_key(config))
    _set_row(config.warehouse.build_db, version, artifact_sha256=json.dumps(hashes, sort_keys=True))
    with pytest.raises(RegistryError, match="_WritesMarker"):
        load_model(config, version)


def test_key_file_is_private_and_the_environment_key_wins(config: ChurnConfig, monkeypatch) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    key_file = config.warehouse.models_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    load_model(config, version)
    monkeypatch.setenv(KEY_ENV_VAR, "another key")
    with pytest.raises(RegistryError, match="signature"):
        load_model(config, version)
