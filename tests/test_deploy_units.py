"""Deployment building blocks that need no processes: certificates, shards, profiles."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    load_config,
    load_profile,
    with_device_settings,
)
from fedpipe.crypto import read_private_pem, write_certs
from fedpipe.data import client_shard, load_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_certs_chain_to_the_ca_cover_the_hosts_and_keep_keys_private(tmp_path: Path) -> None:
    paths = write_certs(tmp_path, ["127.0.0.1", "coordinator.lan"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificates(paths.server_cert.read_bytes())[0]
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.lan"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        read_private_pem(key)  # accepted: owner-only
    assert b"PRIVATE" not in paths.server_cert.read_bytes()
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_certs_refuse_to_overwrite_and_readable_keys_are_refused(tmp_path: Path) -> None:
    write_certs(tmp_path, ["localhost"])
    with pytest.raises(FileExistsError, match="--force"):
        write_certs(tmp_path, ["localhost"])
    assert fedpipe_main(["certs", "--out", str(tmp_path)]) == 1
    key = tmp_path / "server.key"
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_private_pem(key)


def test_partition_writes_one_loadable_shard_per_device(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    args = ["partition.num_clients=3", "partition.scheme=shards", "partition.classes_per_client=2"]
    assert fedpipe_main(["partition", "--out", str(out), *args]) == 0
    cfg = load_config(None, args)
    for cid in range(3):
        ds = load_dataset(DataConfig(dataset="file", path=str(out / f"client-{cid}.npz")))
        want = client_shard(cfg.data, cfg.partition, cfg.seed, cid)
        np.testing.assert_array_equal(ds.train.x.numpy(), want.x.numpy())
        assert len(np.unique(ds.train.y.numpy())) == 2
        assert ds.num_classes == 10  # stored, although the shard holds 2 labels
    assert fedpipe_main(["partition", "--out", str(out), *args]) == 1  # no silent overwrite


@pytest.mark.parametrize("name", ["edge-gpu", "cpu-iot", "auto"])
def test_shipped_device_profiles_are_valid(name: str) -> None:
    settings = load_profile(ROOT / "clients" / f"{name}.toml")
    cfg = with_device_settings(RunConfig(), settings)
    assert cfg.train.device == settings["train.device"]


def test_device_settings_cannot_change_the_experiment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        with_device_settings(RunConfig(), {"train.lr": 1.0})
    with pytest.raises(ConfigError, match="train.batch_size"):
        with_device_settings(RunConfig(), {"train.batch_size": 0})
    bad = tmp_path / "p.toml"
    bad.write_text("[codec]\nscheme = 'int8'\n")
    with pytest.raises(ConfigError, match="codec.scheme"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")


def test_device_checks_its_data_and_profile_before_connecting(tmp_path: Path) -> None:
    from fedpipe.deploy.device import DeviceError, DeviceOptions, node_config, run_device

    shards = tmp_path / "shards"
    assert fedpipe_main(["partition", "--out", str(shards), "partition.num_clients=2"]) == 0
    opts = DeviceOptions(
        superlink="127.0.0.1:1", data=shards, client_id=1, profile=ROOT / "clients/cpu-iot.toml"
    )
    config = node_config(opts)  # a folder + client id finds client-1.npz
    assert config["client-id"] == 1 and config["data-path"].endswith("client-1.npz")
    assert config["train.batch_size"] == 16 and config["train.threads"] == 1
    with pytest.raises(DeviceError, match="no such file"):
        node_config(DeviceOptions(superlink="x:1", data=tmp_path / "nope.npz"))
    with pytest.raises(DeviceError, match="exactly one"):
        node_config(DeviceOptions(superlink="x:1", data=shards))
    broken = tmp_path / "broken.npz"
    np.savez(broken, x=np.zeros((3, 4), np.float32))  # no labels
    with pytest.raises(DeviceError, match="missing arrays"):
        node_config(DeviceOptions(superlink="x:1", data=broken, client_id=0))
    with pytest.raises(DeviceError, match="root-certificates"):  # TLS without a CA: refused
        run_device(DeviceOptions(superlink="x:1", data=shards / "client-0.npz"))
