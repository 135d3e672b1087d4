"""`ansible-playbook site.yml --check --diff`, the run docs/deploy.md recommends, for real.

Both plays run against this machine (`connection: local`) as the broker and as a
device, with every secret a unique marker: the broker's TLS private key, a device's
and a client's MQTT password. Check mode changes nothing on the host; the role's
paths that are variables point into a temporary folder, so the files they name do
not exist yet, as on a host that has nothing. The run must pass, and its output,
diffs included, must not contain any of the secrets.

Skipped where `ansible-playbook` is not installed (pip install ansible-core), and
where the system Python lacks python3-apt (the apt module needs it in check mode).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ANSIBLE = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
SYSTEM_PYTHON = "/usr/bin/python3"
RUN_TIMEOUT_S = 300


def _ansible_playbook() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    found = str(beside) if beside.is_file() else shutil.which("ansible-playbook")
    if found is None:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    return found


def _require_python_apt() -> None:
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import apt"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} has no python3-apt, which the apt module needs")


def test_check_mode_diff_passes_and_prints_no_secret(tmp_path: Path) -> None:
    playbook = _ansible_playbook()
    _require_python_apt()
    key_body = secrets.token_urlsafe(48)
    device_password = f"device-{secrets.token_urlsafe(18)}"
    client_password = f"client-{secrets.token_urlsafe(18)}"
    files = tmp_path / "files"
    files.mkdir()
    (files / "server.key").write_text(
        f"-----BEGIN PRIVATE KEY-----\n{key_body}\n-----END PRIVATE KEY-----\n"
    )
    for name in ("server.crt", "ca.crt"):
        (files / name).write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    package = files / "edgedi-0.1.0-py3-none-any.whl"  # never installed: check mode
    package.write_bytes(b"PK\x05\x06" + bytes(18))
    root = tmp_path / "root"  # where the roles' configurable paths point

    host: dict[str, object] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": SYSTEM_PYTHON,
        "ansible_become": False,  # tests run as whoever they run as, without sudo
        "edgedi_cluster": "line-3",
        "edgedi_broker_host": "mqtt.example.lan",
        "edgedi_mqtt_password": device_password,
        # The broker's files.
        "mosquitto_cluster": "line-3",
        "mosquitto_config_file": f"{root}/etc/mosquitto/mosquitto.conf",
        "mosquitto_password_file": f"{root}/etc/mosquitto/edgedi.passwd",
        "mosquitto_acl_file": f"{root}/etc/mosquitto/edgedi.acl",
        "mosquitto_tls_certfile": f"{root}/etc/mosquitto/certs/server.crt",
        "mosquitto_tls_keyfile": f"{root}/etc/mosquitto/certs/server.key",
        "mosquitto_tls_certfile_source": str(files / "server.crt"),
        "mosquitto_tls_keyfile_source": str(files / "server.key"),
        "mosquitto_clients": [{"username": "dashboard", "password": client_password}],
        # The device's files.
        "edgedi_install_dir": f"{root}/opt/edgedi",
        "edgedi_package_path": str(package),  # no wheel build in a test
        "edgedi_broker_tls_ca_file": f"{root}/etc/edgedi/mqtt-ca.crt",
        "edgedi_broker_tls_ca_source": str(files / "ca.crt"),
    }
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {"localhost": host},
                    "children": {
                        "broker": {"hosts": {"localhost": None}},
                        "agents": {"hosts": {"localhost": None}},
                    },
                }
            }
        )
    )
    environment = dict(
        os.environ,
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    environment["PATH"] = f"{Path(playbook).parent}{os.pathsep}{environment.get('PATH', '')}"
    result = subprocess.run(
        [playbook, "-i", str(inventory), "site.yml", "--check", "--diff"],
        cwd=ANSIBLE,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "PLAY RECAP" in output and "failed=0" in output, output[-3000:]
    # The run did reach the secrets' tasks (else "no secret printed" proves nothing).
    assert "Install the TLS private key" in output
    assert "Install the MQTT password as a systemd credential" in output
    leaked = [
        name
        for name, secret in {
            "the TLS key's PEM header": "PRIVATE KEY",
            "the TLS key": key_body,
            "the device's MQTT password": device_password,
            "the client's MQTT password": client_password,
        }.items()
        if secret in output
    ]
    assert not leaked, f"printed {leaked}"
