"""The deployment files: Ansible roles and playbooks, their templates, the systemd unit.

Ansible itself is not needed: the YAML is parsed, the roles' layout and argument
specs are checked against their defaults, the Jinja2 templates are rendered with a
few stand-ins for Ansible's filters, and what they render is fed to the real
consumers where we have them (the agent's settings loader, configparser,
`systemd-analyze`). Where `ansible-lint` is installed (a dev dependency), the
production profile must pass; tests/integration/test_rollout.py runs the playbooks.
The Mosquitto ACL is checked with an evaluator of Mosquitto's ACL rules against the
topic catalogue: every identity gets exactly the access its role in the protocol
needs, no more.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from role_templates import ansible_bool as _ansible_bool
from role_templates import environment as _environment
from role_templates import jinja2
from role_templates import render as _render
from role_templates import role_defaults as _role_defaults
from role_templates import variables as _variables

from edgedi.agent.config import (
    BrokerSettings,
    HomeAssistantSettings,
    JobSettings,
    MetricsSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ANSIBLE = DEPLOY / "ansible"
ROLES = ANSIBLE / "roles"
UNIT = DEPLOY / "systemd" / "edgedi-agent.service"
TOPICS_DOC = ROOT / "docs" / "topics.md"

ROLE_PREFIXES = {"mosquitto": "mosquitto_", "edgedi": "edgedi_"}
# Words that look like role variables but are not (executables, file names).
NOT_VARIABLES = {"mosquitto_passwd", "mosquitto_sub", "mosquitto_pub"}
ARGUMENT_TYPES = {"str", "int", "bool", "list", "dict", "path", "raw", "float"}
TASK_KEYWORDS = {
    "name", "when", "register", "loop", "loop_control", "notify", "become", "delegate_to",
    "delegate_facts", "run_once", "check_mode", "changed_when", "failed_when", "no_log",
    "vars", "environment", "until", "retries", "delay", "tags", "ignore_errors", "listen",
    "block", "rescue", "always", "diff", "any_errors_fatal",
}  # fmt: skip

YAML_FILES = sorted([*ANSIBLE.rglob("*.yml"), *ANSIBLE.rglob("*.yaml")])
TEMPLATES = sorted(ROLES.glob("*/templates/*.j2"))


# --- helpers ------------------------------------------------------------------------


def _default(model: type[BaseModel], name: str) -> Any:
    """A settings field's default, without constructing the model."""
    return model.model_fields[name].default


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _role_options(role: str) -> dict[str, Any]:
    meta = _load(ROLES / role / "meta" / "main.yml")
    options: dict[str, Any] = meta["argument_specs"]["main"]["options"]
    return options


def _iter_tasks(tasks: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    """Every task, blocks included (the block itself too), depth first."""
    for task in tasks or []:
        yield task
        for section in ("block", "rescue", "always"):
            yield from _iter_tasks(task.get(section))


def _role_task_files(role: str) -> list[Path]:
    return sorted([*(ROLES / role / "tasks").glob("*.yml"), ROLES / role / "handlers" / "main.yml"])


def _playbooks() -> list[Path]:
    return sorted(path for path in ANSIBLE.glob("*.yml") if isinstance(_load(path), list))


needs_jinja = pytest.mark.skipif(jinja2 is None, reason="jinja2 (a torch dependency) missing")


def _unit_values(text: str) -> dict[tuple[str, str], list[str]]:
    """Every value of every key, per section (systemd allows repeated keys)."""
    values: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault((section, key.strip()), []).append(value.strip())
    return values


# --- YAML, layout, argument specs -------------------------------------------------------


def test_there_is_something_to_check() -> None:
    assert YAML_FILES and TEMPLATES and UNIT.is_file()
    assert sorted(path.name for path in ROLES.iterdir()) == sorted(ROLE_PREFIXES)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ANSIBLE)))
def test_yaml_parses(path: Path) -> None:
    assert _load(path) is not None


@pytest.mark.parametrize("role", sorted(ROLE_PREFIXES))
def test_role_has_the_standard_layout(role: str) -> None:
    for part in ("defaults", "tasks", "handlers", "meta"):
        assert (ROLES / role / part / "main.yml").is_file(), f"{role}: {part}/main.yml"
    assert list((ROLES / role / "templates").glob("*.j2")), f"{role}: no templates"
    meta = _load(ROLES / role / "meta" / "main.yml")
    info = meta["galaxy_info"]
    for key in ("role_name", "description", "license", "min_ansible_version", "platforms"):
        assert info.get(key), f"{role}: galaxy_info.{key}"
    assert meta["dependencies"] == []
    assert meta["argument_specs"]["main"]["short_description"]


@pytest.mark.parametrize("role", sorted(ROLE_PREFIXES))
def test_argument_specs_cover_the_defaults(role: str) -> None:
    defaults, options = _role_defaults(role), _role_options(role)
    assert not set(defaults) - set(options), "defaults without an argument spec"
    for name, spec in options.items():
        assert name.startswith(ROLE_PREFIXES[role]), f"{name}: not prefixed"
        assert spec.get("description"), f"{name}: no description"
        assert spec.get("type") in ARGUMENT_TYPES, f"{name}: type {spec.get('type')}"
        # Anything without a default must be required, so a missing value fails early.
        assert name in defaults or spec.get("required") is True, f"{name}: no default"
        if "choices" in spec and name in defaults:
            assert defaults[name] in spec["choices"], f"{name}: default not in choices"


def _declared_names(role: str) -> set[str]:
    declared = set(_role_options(role)) | NOT_VARIABLES
    for path in _role_task_files(role):
        for task in _iter_tasks(_load(path)):
            if "register" in task:
                declared.add(task["register"])
            declared.update(task.get("vars", {}))
            declared.update(task.get("ansible.builtin.set_fact", {}))
            declared.add(task.get("loop_control", {}).get("loop_var", "item"))
    return declared


@pytest.mark.parametrize("role", sorted(ROLE_PREFIXES))
def test_role_uses_only_declared_variables(role: str) -> None:
    """A typo in a variable name would otherwise surface only on a real device."""
    pattern = re.compile(rf"\b{ROLE_PREFIXES[role]}[a-z0-9_]+\b")
    declared = _declared_names(role)
    files = [*_role_task_files(role), *(ROLES / role / "templates").glob("*.j2")]
    files.append(ROLES / role / "defaults" / "main.yml")
    for path in files:
        unknown = set(pattern.findall(path.read_text())) - declared
        assert not unknown, f"{path.relative_to(ANSIBLE)}: undeclared {sorted(unknown)}"


def test_inventory_example_uses_declared_variables() -> None:
    declared = {name for role in ROLE_PREFIXES for name in _declared_names(role)}
    text = (ANSIBLE / "inventory.example.yml").read_text()
    used = set(re.findall(r"\b((?:edgedi|mosquitto)_[a-z0-9_]+)\s*:", text))
    assert used and not used - declared, sorted(used - declared)


def test_vault_example_has_a_password_for_every_identity() -> None:
    inventory = _load(ANSIBLE / "inventory.example.yml")["all"]["children"]
    vault = _load(ANSIBLE / "vault.example.yml")
    devices = {
        (host_vars or {}).get("edgedi_device_id", host)
        for host, host_vars in inventory["agents"]["hosts"].items()
    }
    assert devices == set(vault["vault_edgedi_mqtt_passwords"])
    clients = {client["username"] for client in inventory["broker"]["vars"]["mosquitto_clients"]}
    assert clients == set(vault["vault_mosquitto_client_passwords"])


def _all_tasks() -> Iterator[tuple[str, dict[str, Any]]]:
    for role in ROLE_PREFIXES:
        for path in _role_task_files(role):
            for task in _iter_tasks(_load(path)):
                yield str(path.relative_to(ANSIBLE)), task
    for path in _playbooks():
        for play in _load(path):
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                for task in _iter_tasks(play.get(section)):
                    yield path.name, task


def test_tasks_are_named_and_use_builtin_modules() -> None:
    for where, task in _all_tasks():
        assert task.get("name"), f"{where}: unnamed task {task}"
        if "block" in task:
            continue
        modules = [key for key in task if key not in TASK_KEYWORDS]
        assert len(modules) == 1, f"{where}: {task['name']}: {modules}"
        assert modules[0].startswith("ansible.builtin."), f"{where}: {modules[0]} is not FQCN"
        if modules[0] in {"ansible.builtin.command", "ansible.builtin.shell"}:
            assert "changed_when" in task, f"{where}: {task['name']}: no changed_when"


def test_playbooks_roll_out_in_batches_after_the_broker() -> None:
    site = _load(ANSIBLE / "site.yml")
    assert [play["ansible.builtin.import_playbook"] for play in site] == [
        "broker.yml",
        "agents.yml",
    ]
    (agents,) = _load(ANSIBLE / "agents.yml")
    assert agents["hosts"] == "agents" and agents["become"] is True
    assert agents["serial"][0] == 1, "a canary batch of one device first"
    assert 0 <= agents["max_fail_percentage"] < 50
    assert [role["role"] for role in agents["roles"]] == ["edgedi"]
    (broker,) = _load(ANSIBLE / "broker.yml")
    assert broker["hosts"] == "broker"
    assert [role["role"] for role in broker["roles"]] == ["mosquitto"]


def _tool(name: str) -> str | None:
    """An executable of the test's venv (ansible-lint, ansible-playbook), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def test_ansible_lint_production_profile_is_clean() -> None:
    lint = _tool("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint is not installed (pip install ansible-lint)")
    environment = dict(os.environ, NO_COLOR="1")
    environment["PATH"] = f"{Path(lint).parent}{os.pathsep}{environment.get('PATH', '')}"
    result = subprocess.run(
        [lint, "--offline", "--profile", "production", "-f", "pep8", "."],
        cwd=ANSIBLE,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def _fleet_check(
    tmp_path: Path, hosts: dict[str, dict[str, str]]
) -> subprocess.CompletedProcess[str]:
    """The role's own id check (tasks/identity.yml, with the role's defaults) on an
    inventory of local hosts, all in the group agents."""
    playbook = _tool("ansible-playbook")
    if playbook is None:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    inventory = {
        "all": {
            "hosts": {
                name: {"ansible_connection": "local", **values} for name, values in hosts.items()
            },
            "children": {"agents": {"hosts": dict.fromkeys(hosts)}},
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    play = [
        {
            "name": "Check the ids",
            "hosts": "agents",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "The role's check",
                    "ansible.builtin.include_role": {
                        "name": str(ROLES / "edgedi"),
                        "tasks_from": "identity",
                    },
                },
                {"name": "Went on", "ansible.builtin.debug": {"msg": "went on"}},
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    environment = dict(
        os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_HOME=str(tmp_path / "home"), NO_COLOR="1"
    )
    return subprocess.run(
        [playbook, "-i", "inventory.yml", "play.yml"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_role_refuses_an_inventory_with_a_duplicate_device_id(tmp_path: Path) -> None:
    # pi-2 was cloned from pi-1's card and its inventory entry copied with it.
    result = _fleet_check(tmp_path, {"pi-1": {}, "pi-2": {"edgedi_device_id": "pi-1"}, "pi-3": {}})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Device ids used by more than one host: pi-1 (pi-1, pi-2)" in output, output
    assert "went on" not in output, "a host of the fleet went on after the check failed"


def test_the_role_accepts_unique_device_ids(tmp_path: Path) -> None:
    result = _fleet_check(tmp_path, {"pi-1": {}, "pi-2": {"edgedi_device_id": "cam-2"}, "pi-3": {}})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("went on") == 3, output


def test_the_unit_does_not_restart_an_agent_whose_id_is_taken() -> None:
    from edgedi.agent.identity import EXIT_DUPLICATE_ID

    values = _unit_values(UNIT.read_text())
    assert values[("Service", "RestartPreventExitStatus")] == [str(EXIT_DUPLICATE_ID)]


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_template_is_well_formed(path: Path) -> None:
    text = path.read_text()
    for opening, closing in (("{{", "}}"), ("{%", "%}"), ("{#", "#}")):
        assert text.count(opening) == text.count(closing), f"unbalanced {opening} {closing}"
    if jinja2 is not None:
        _environment().parse(text)


# --- the agent's settings ---------------------------------------------------------------


@needs_jinja
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"edgedi_broker_tls_ca_file": ""},
        {
            "edgedi_device_id": "cam-1",
            "edgedi_broker_host": "mqtt.example.lan",
            "edgedi_candidate": "no",
            "edgedi_priority": 3,
            "edgedi_threads": 2,
            "edgedi_models": ["tiny", "tiny-edgedi"],
            "edgedi_strategy": "equal",
            "edgedi_cluster": "line-3",
            "edgedi_wire_dtype": "float16",
            "edgedi_log_level": "debug",
            "edgedi_metrics_port": 9464,
            "edgedi_metrics_host": "0.0.0.0",
            "edgedi_home_assistant_discovery": True,
            "edgedi_home_assistant_prefix": "ha",
        },
    ],
    ids=["defaults", "plain-mqtt", "worker"],
)
def test_agent_yaml_renders_to_settings_the_agent_accepts(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    certificate = tmp_path / "mqtt-ca.crt"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    overrides.setdefault("edgedi_broker_tls_ca_file", str(certificate))
    variables = _variables("edgedi", **overrides)
    config = tmp_path / "agent.yaml"
    config.write_text(_render("edgedi", "agent.yaml.j2", **overrides))
    # The password arrives as the systemd credential named in the unit.
    credential = _unit_values(UNIT.read_text())[("Service", "LoadCredential")][0]
    name, _, source = credential.partition(":")
    assert source == "/etc/edgedi/mqtt-password"
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / name).write_text("s3cret-password\n")

    settings = load_settings(
        config, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
    )

    assert settings.device_id == variables["edgedi_device_id"]
    assert settings.broker.host == variables["edgedi_broker_host"]
    assert settings.broker.port == variables["edgedi_broker_port"]
    assert settings.broker.username == variables["edgedi_device_id"]
    assert settings.broker.password == "s3cret-password"
    tls = variables["edgedi_broker_tls_ca_file"]
    assert settings.broker.tls_ca_file == (Path(tls) if tls else None)
    assert settings.broker.topic_root == variables["edgedi_topic_root"]
    assert settings.broker.cluster == variables["edgedi_cluster"]
    assert settings.broker.keepalive_s == variables["edgedi_keepalive_s"]
    assert settings.planner.candidate is _ansible_bool(variables["edgedi_candidate"])
    assert settings.planner.priority == variables["edgedi_priority"]
    assert settings.compute.threads == variables["edgedi_threads"]
    assert settings.jobs.wire_dtype == variables["edgedi_wire_dtype"]
    assert settings.metrics.port == variables["edgedi_metrics_port"]
    assert settings.metrics.host == variables["edgedi_metrics_host"]
    assert settings.home_assistant.discovery is variables["edgedi_home_assistant_discovery"]
    assert settings.home_assistant.discovery_prefix == variables["edgedi_home_assistant_prefix"]
    assert settings.log_level == variables["edgedi_log_level"]
    if variables["edgedi_models"]:
        assert settings.compute.models == variables["edgedi_models"]
    if variables["edgedi_strategy"]:
        assert settings.planner.strategy == variables["edgedi_strategy"]


def test_role_defaults_agree_with_the_agent_and_the_broker() -> None:
    agent, broker = _role_defaults("edgedi"), _role_defaults("mosquitto")
    assert agent["edgedi_topic_root"] == broker["mosquitto_topic_root"] == "edgedi/v1"
    assert agent["edgedi_topic_root"] == _default(BrokerSettings, "topic_root")
    assert (
        agent["edgedi_cluster"]
        == broker["mosquitto_cluster"]
        == _default(BrokerSettings, "cluster")
    )
    assert agent["edgedi_broker_port"] == broker["mosquitto_port"]
    # The broker drops what the agents would reject anyway, and nothing they accept.
    assert broker["mosquitto_message_size_limit"] == _default(JobSettings, "max_payload_bytes")
    assert broker["mosquitto_max_packet_size"] > broker["mosquitto_message_size_limit"]
    assert broker["mosquitto_max_queued_bytes"] >= broker["mosquitto_message_size_limit"]
    # The ACL grants discovery topics under the prefix the agents publish them to.
    assert (
        agent["edgedi_home_assistant_prefix"]
        == broker["mosquitto_home_assistant_prefix"]
        == _default(HomeAssistantSettings, "discovery_prefix")
    )
    assert agent["edgedi_home_assistant_discovery"] is _default(HomeAssistantSettings, "discovery")
    assert agent["edgedi_metrics_port"] is _default(MetricsSettings, "port") is None
    assert agent["edgedi_metrics_host"] == _default(MetricsSettings, "host")


@needs_jinja
def test_drop_in_opens_the_sandbox_only_for_cameras() -> None:
    plain = _unit_values(_render("edgedi", "10-ansible.conf.j2"))
    assert plain == {}
    camera = _render(
        "edgedi",
        "10-ansible.conf.j2",
        edgedi_camera_devices=["/dev/video0", "/dev/video2"],
        edgedi_memory_max="600M",
        edgedi_environment={"OMP_WAIT_POLICY": "PASSIVE"},
    )
    configparser.ConfigParser(strict=False, interpolation=None).read_string(camera)
    values = _unit_values(camera)
    assert values[("Service", "PrivateDevices")] == ["no"]
    assert values[("Service", "PrivateUsers")] == ["no"]
    assert values[("Service", "DevicePolicy")] == ["closed"]
    assert values[("Service", "DeviceAllow")] == ["/dev/video0 rw", "/dev/video2 rw"]
    assert values[("Service", "SupplementaryGroups")] == ["video"]
    assert values[("Service", "MemoryMax")] == ["600M"]
    assert values[("Service", "Environment")] == ['"OMP_WAIT_POLICY=PASSIVE"']


@needs_jinja
@pytest.mark.parametrize(("version", "backoff"), [(252, False), (254, True), (257, True)])
def test_drop_in_adds_restart_backoff_only_where_systemd_knows_it(
    version: int, backoff: bool
) -> None:
    facts = {"systemd": {"version": version, "features": "+PAM"}}
    values = _unit_values(_render("edgedi", "10-ansible.conf.j2", ansible_facts=facts))
    assert (("Service", "RestartSteps") in values) is backoff
    assert (("Service", "RestartMaxDelaySec") in values) is backoff


# --- the systemd unit --------------------------------------------------------------------


def test_unit_file_parses_and_has_the_essentials() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    values = _unit_values(UNIT.read_text())

    def one(key: str) -> str:
        (value,) = values[("Service", key)]
        return value

    assert one("Type") == "notify"
    assert one("Restart") == "on-failure"
    assert one("DynamicUser") == "yes"
    assert one("StateDirectory") == "edgedi"
    assert one("ConfigurationDirectory") == "edgedi"
    assert one("LoadCredential") == "mqtt-password:/etc/edgedi/mqtt-password"
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "@system-service" in values[("Service", "SystemCallFilter")]
    for key, wanted in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
    }.items():
        assert one(key) == wanted, key
    assert one("MemoryMax")
    assert ("Service", "CPUQuota") not in values
    assert "#CPUQuota=" in UNIT.read_text(), "CPUQuota stays documented, commented out"
    # The compute thread's liveness probe queues behind tile steps (edgedi.agent.systemd):
    # a slow device's longest step must be far from the limit.
    watchdog = one("WatchdogSec")
    assert watchdog.endswith("s") and int(watchdog[:-1]) >= 20

    command = shlex.split(one("ExecStart"))
    venv = _variables("edgedi")["edgedi_venv"]
    assert command == [f"{venv}/bin/edgedi", "agent", "--config", "/etc/edgedi/agent.yaml"]
    assert values[("Install", "WantedBy")] == ["multi-user.target"]


@needs_jinja
def test_the_documentation_the_unit_names_is_installed() -> None:
    (documentation,) = _unit_values(UNIT.read_text())[("Unit", "Documentation")]
    assert documentation.startswith("file://"), documentation
    environment, variables = _environment(), _variables("edgedi")
    installed: dict[str, str] = {}
    for path in _role_task_files("edgedi"):
        for task in _iter_tasks(_load(path)):
            copy = task.get("ansible.builtin.copy", {})
            try:
                source = environment.from_string(copy["src"]).render(variables)
                destination = environment.from_string(copy["dest"]).render(variables)
            except (KeyError, jinja2.UndefinedError):
                continue  # no copy of a file, or one of a file known only at run time
            installed[destination] = source
    source = installed.get(documentation.removeprefix("file://"))
    assert source is not None, f"no task installs {documentation}"
    assert Path(source).resolve() == ROOT / "docs" / "deploy.md"


def _systemd_analyze(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *arguments], capture_output=True, text=True, timeout=60, check=False
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # A trivial unit first: if even that fails, this machine cannot verify units.
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    if _systemd_analyze("verify", str(probe)).returncode != 0:
        pytest.skip("systemd-analyze verify does not work in this container")
    # The venv does not exist here; everything else is verified as written.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/edgedi/venv/bin/edgedi", "/bin/true"))
    result = _systemd_analyze("verify", str(unit))
    assert result.returncode == 0, result.stderr
    # Not even an "Unknown key" warning: this machine's systemd (252 when written)
    # is the declared platform's, Debian 12 / Raspberry Pi OS bookworm.
    problems = [line for line in result.stderr.splitlines() if line.strip()]
    assert not problems, problems


@needs_systemd_analyze
def test_systemd_analyze_security_score() -> None:
    result = _systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unavailable: {result.stderr[-200:]}")
    # 1.2 "OK" when written (1.6 with the camera drop-in); 10 is an unsandboxed root service.
    assert float(match.group(1)) <= 2.0, result.stdout


# --- Mosquitto ---------------------------------------------------------------------------

DEVICES: list[dict[str, Any]] = [
    {"id": "pi-1", "password": "password-pi-1", "candidate": True},
    {"id": "pi-2", "password": "password-pi-2", "candidate": False},
    {"id": "cam-1", "password": "password-cam-1", "candidate": False, "submit_jobs": True},
]
CLIENTS: list[dict[str, Any]] = [
    {"username": "dashboard", "password": "password-dashboard"},
    {"username": "operator", "password": "password-operator", "monitor": True},
    {"username": "home", "password": "password-home", "home_assistant": True},
]
ROOT_TOPIC = "edgedi/v1/line-3"


@needs_jinja
def test_mosquitto_conf_sets_what_edgedi_relies_on() -> None:
    defaults = _role_defaults("mosquitto")
    text = _render("mosquitto", "mosquitto.conf.j2", mosquitto_devices=DEVICES)
    lines = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    settings: dict[str, list[str]] = {}
    for key, *value in lines:
        settings.setdefault(key, []).append(value[0] if value else "")

    def one(key: str) -> str:
        (value,) = settings[key]
        return value

    assert one("set_tcp_nodelay") == "true"
    assert one("persistence") == "false"
    assert one("allow_anonymous") == "false"
    assert one("per_listener_settings") == "false"
    assert one("password_file") == defaults["mosquitto_password_file"]
    assert one("acl_file") == defaults["mosquitto_acl_file"]
    for key in ("message_size_limit", "max_packet_size", "max_inflight_messages",
                "max_inflight_bytes", "max_queued_messages", "max_queued_bytes"):  # fmt: skip
        assert int(one(key)) == defaults[f"mosquitto_{key}"], key
    assert settings["listener"] == ["8883", "1883 127.0.0.1"]
    assert one("certfile") == defaults["mosquitto_tls_certfile"]
    assert one("keyfile") == defaults["mosquitto_tls_keyfile"]
    assert one("tls_version") == "tlsv1.2"

    plain = _render("mosquitto", "mosquitto.conf.j2", mosquitto_tls=False, mosquitto_port=1883)
    assert "certfile" not in plain
    assert re.findall(r"^listener .*$", plain, re.MULTILINE) == ["listener 1883"]


@needs_jinja
def test_password_template_lists_every_identity() -> None:
    text = _render(
        "mosquitto", "passwords.j2", mosquitto_devices=DEVICES, mosquitto_clients=CLIENTS
    )
    assert text.splitlines() == [
        "pi-1:password-pi-1",
        "pi-2:password-pi-2",
        "cam-1:password-cam-1",
        "dashboard:password-dashboard",
        "operator:password-operator",
        "home:password-home",
    ]


def _topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching, as Mosquitto applies ACL entries to topics."""
    pattern_levels, topic_levels = pattern.split("/"), topic.split("/")
    for index, level in enumerate(pattern_levels):
        if level == "#":
            return not topic_levels[0].startswith("$") or index > 0
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(pattern_levels) == len(topic_levels)


@dataclass
class Acl:
    """Mosquitto's ACL file semantics: deny first, then any matching grant."""

    users: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    patterns: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Acl:
        acl, user = cls(), ""
        for raw in text.splitlines():
            words = raw.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "user":
                user = words[1]
                acl.users.setdefault(user, [])
                continue
            assert words[0] in {"topic", "pattern"}, raw
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            assert access in {"read", "write", "readwrite", "deny"}, raw
            assert user or words[0] == "pattern", f"anonymous rule: {raw}"
            if words[0] == "pattern":
                acl.patterns.append((access, topic))
            else:
                acl.users[user].append((access, topic))
        return acl

    def allows(self, user: str, access: str, topic: str) -> bool:
        rules = [*self.users.get(user, []), *((a, t.replace("%u", user)) for a, t in self.patterns)]
        if any(a == "deny" and _topic_matches(t, topic) for a, t in rules):
            return False
        return any(a in {access, "readwrite"} and _topic_matches(t, topic) for a, t in rules)


# For each topic of the catalogue (docs/protocol): who writes it and who reads it.
# {device} is a device id, {job} a job id. Roles: "owner" (the device named in the
# topic), "device" (any device), "candidate" (may become leader/coordinator),
# "submitter" (a client, or a device with submit_jobs), "client" (an account of
# `mosquitto_clients`), "monitor" (operators).
CATALOGUE: dict[str, tuple[set[str], set[str]]] = {
    # Clients read the public records too: `edgedi status`, `watch` and `infer`.
    "devices/{device}/birth": ({"owner"}, {"device", "owner", "client"}),
    "devices/{device}/state": ({"owner"}, {"device", "owner", "home_assistant", "client"}),
    # Every device reads the leader's heartbeat: it echoes theirs (clock offsets).
    "devices/{device}/heartbeat": ({"owner"}, {"device", "owner", "client"}),
    "devices/{device}/tasks": ({"candidate", "owner"}, {"owner"}),
    # The direct data plane: only the sender writes, only the target (and the sender,
    # under its own prefix) reads.
    "devices/{device}/peer/{target}": ({"owner"}, {"owner", "target"}),
    "devices/{device}/probe": ({"owner"}, {"owner"}),
    # Gate partials of the direct plane: published once, read by every device.
    "devices/{device}/partials": ({"owner"}, {"device", "owner"}),
    # A client believes a result only from the leader of its epoch (agent.client).
    "planner/leader": ({"candidate"}, {"device", "client"}),
    "plans/current": ({"candidate"}, {"device", "client"}),
    "jobs/submit": ({"submitter"}, {"candidate"}),
    # What a worker or the leader answers carries its own id: nobody writes another's.
    "jobs/{job}/partials/{device}": ({"owner"}, {"candidate"}),
    "jobs/{job}/gates": ({"candidate"}, {"device"}),
    "jobs/{job}/tiles/{device}": ({"owner"}, {"candidate"}),
    "results/{job}/{device}": ({"owning candidate"}, {"candidate", "submitter"}),
    "control/rebirth": ({"candidate"}, {"device"}),
    # The leader's last result, for dashboards (Home Assistant's cluster sensors).
    "summary/last_result": ({"candidate"}, {"submitter"}),
}


def _roles_of(
    identity: Mapping[str, Any], owner: str | None, target: str | None = None
) -> set[str]:
    if "username" in identity:
        return (
            {"submitter", "client"}
            | ({"monitor"} if identity.get("monitor") else set())
            | ({"home_assistant"} if identity.get("home_assistant") else set())
        )
    roles = {"device"}
    if identity.get("candidate", True):
        roles.add("candidate")
    if identity.get("submit_jobs"):
        roles.add("submitter")
    if identity["id"] == owner:
        roles.add("owner")
        if "candidate" in roles:
            roles.add("owning candidate")
    if identity["id"] == target:
        roles.add("target")
    return roles


def _placeholder(level: str) -> bool:
    return level in {"+", "#"} or bool(re.fullmatch(r"<[^>]+>|\{[^}]+\}", level))


def _normalise(topic: str) -> str:
    """`devices/<id>/birth`, `devices/+/birth`, `devices/{device}/birth` → one spelling."""
    levels = topic.split("/")
    names = {"devices": "{device}", "peer": "{target}", "tiles": "{device}", "partials": "{device}"}

    def name(i: int) -> str:
        if levels[0] == "results" and i == 2:
            return "{device}"  # results/{job}/{device}
        return names.get(levels[i - 1], "{job}")

    return "/".join(name(i) if _placeholder(level) else level for i, level in enumerate(levels))


def _documented_topics(text: str) -> set[str]:
    """Topics in docs/topics.md, written relative to the root or in full."""
    namespaces = {key.split("/")[0] for key in CATALOGUE}
    root = re.compile(r"^(?:edgedi/v1/[^/]+/|<[^>]+>/|\{[^}]+\}/)")
    found = set()
    for candidate in re.findall(r"`([^`\s]+)`", text):
        has_root = bool(root.match(candidate))
        topic = root.sub("", candidate).rstrip("/")
        levels = topic.split("/")
        if len(levels) < 2 or "" in levels or "#" in levels or re.search(r"\.\w+$", topic):
            continue
        if not has_root and levels[0] not in namespaces:
            continue
        found.add(_normalise(topic))
    return found


def test_catalogue_matches_the_broker_catalogue() -> None:
    """The ACL's topic table is the broker's catalogue (edgedi.broker.topics)."""
    topics = pytest.importorskip("edgedi.broker.topics")
    assert {_normalise(spec.pattern) for spec in topics.CATALOGUE} == set(CATALOGUE)
    assert _role_defaults("mosquitto")["mosquitto_topic_root"] == topics.DEFAULT_PREFIX


def test_catalogue_matches_the_documented_topics() -> None:
    if not TOPICS_DOC.is_file():
        pytest.skip("docs/topics.md not written yet; CATALOGUE follows the protocol notes")
    documented = _documented_topics(TOPICS_DOC.read_text())
    assert documented, "no topics recognised in docs/topics.md"
    missing = documented - set(CATALOGUE)
    assert not missing, (
        f"topics in docs/topics.md without ACL rules: {sorted(missing)}; "
        "update deploy/ansible/roles/mosquitto/templates/acl.j2 and CATALOGUE"
    )


def test_documented_topic_parsing() -> None:
    text = (
        "| `edgedi/v1/<cluster>/devices/<device>/birth` | retained |\n"
        "| `jobs/{job_id}/tiles` | see `broker/topics.py`, `application/json` |\n"
        "`results/+` and `results/#` and `control/rebirth`"
    )
    assert _documented_topics(text) == {
        "devices/{device}/birth",
        "jobs/{job}/tiles",
        "results/{job}",
        "control/rebirth",
    }


@needs_jinja
def test_acl_gives_every_identity_exactly_what_the_protocol_needs() -> None:
    acl = Acl.parse(
        _render(
            "mosquitto",
            "acl.j2",
            mosquitto_devices=DEVICES,
            mosquitto_clients=CLIENTS,
            mosquitto_cluster="line-3",
        )
    )
    identities: list[tuple[str, Mapping[str, Any]]] = [
        *((str(device["id"]), device) for device in DEVICES),
        *((str(client["username"]), client) for client in CLIENTS),
    ]
    assert set(acl.users) == {name for name, _ in identities}
    owners = [str(device["id"]) for device in DEVICES]
    wrong = []
    for pattern, (writers, readers) in CATALOGUE.items():
        pairs = [
            (owner, target)
            for owner in (owners if "{device}" in pattern else [None])
            for target in (owners if "{target}" in pattern else [None])
        ]
        for owner, target in pairs:
            topic = f"{ROOT_TOPIC}/" + pattern.format(device=owner, target=target, job="job-42")
            for name, identity in identities:
                roles = _roles_of(identity, owner, target)
                for access, allowed_roles in (("write", writers), ("read", readers)):
                    expected = bool(roles & allowed_roles) or (
                        access == "read" and "monitor" in roles
                    )
                    if acl.allows(name, access, topic) != expected:
                        wrong.append(f"{name} {access} {topic}: expected {expected}")
    assert not wrong, "\n".join(wrong)
    # Other clusters on the same broker and the broker's own topics stay closed.
    assert not acl.allows("pi-1", "read", "edgedi/v1/other/plans/current")
    assert not acl.allows("dashboard", "read", "$SYS/broker/uptime")
    assert acl.allows("operator", "read", "$SYS/broker/uptime")


@needs_jinja
def test_acl_binds_home_assistant_discovery_topics_to_their_device() -> None:
    acl = Acl.parse(
        _render(
            "mosquitto",
            "acl.j2",
            mosquitto_devices=[*DEVICES, {"id": "pi.4", "password": "p", "candidate": False}],
            mosquitto_clients=CLIENTS,
            mosquitto_cluster="line-3",
        )
    )
    own = "homeassistant/binary_sensor/{}/connectivity/config"
    for device in ("pi-1", "pi-2", "cam-1"):
        assert acl.allows(device, "write", own.format(device))
        assert not acl.allows(device, "write", own.format("pi-1" if device != "pi-1" else "pi-2"))
    # Home Assistant's node ids have no ".": the agent and the ACL both write "_".
    assert acl.allows("pi.4", "write", own.format("pi_4"))
    cluster = "homeassistant/sensor/edgedi_line-3/latency/config"
    assert acl.allows("pi-1", "write", cluster)  # a candidate, maybe the leader
    assert not acl.allows("pi-2", "write", cluster)
    assert not acl.allows("pi-1", "write", "homeassistant/sensor/edgedi_other/latency/config")
    assert acl.allows("home", "read", cluster)
    assert acl.allows("home", "read", own.format("pi-2"))
    assert acl.allows("home", "write", "homeassistant/status")
    assert not acl.allows("dashboard", "read", cluster)
    assert not acl.allows("home", "write", cluster)
    # No prefix, no grants.
    closed = Acl.parse(
        _render(
            "mosquitto",
            "acl.j2",
            mosquitto_devices=DEVICES,
            mosquitto_clients=CLIENTS,
            mosquitto_home_assistant_prefix="",
        )
    )
    assert not closed.allows("pi-1", "write", own.format("pi-1"))
    assert not closed.allows("home", "read", cluster)


def test_topic_matching() -> None:
    cases: list[tuple[str, str, bool]] = [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/c", False),
    ]
    check: Callable[[str, str], bool] = _topic_matches
    assert [check(pattern, topic) for pattern, topic, _ in cases] == [c[2] for c in cases]
