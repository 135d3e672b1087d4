"""The Ansible roles' templates rendered as Ansible would, without Ansible.

A Jinja2 environment configured like the template module (StrictUndefined,
trim_blocks, the few filters the roles use), and each role's defaults templated
against each other. tests/unit/test_deploy.py checks the rendered files;
tests/system/test_system_connection.py starts a Mosquitto from them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

try:
    import jinja2
except ImportError:  # pragma: no cover - jinja2 comes with torch
    jinja2 = None  # type: ignore[assignment]

ROLES = Path(__file__).resolve().parents[1] / "deploy" / "ansible" / "roles"
ANSIBLE = ROLES.parent


def role_defaults(role: str) -> dict[str, Any]:
    defaults: dict[str, Any] = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    return defaults or {}


def ansible_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"yes", "on", "1", "true", "y", "t"}
    return bool(value)


def environment() -> Any:
    """A Jinja2 environment configured like Ansible's template module."""
    assert jinja2 is not None
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True
    )
    environment.filters.update(
        to_json=json.dumps, bool=ansible_bool, quote=shlex.quote, basename=lambda p: Path(p).name
    )
    return environment


def variables(role: str, **overrides: Any) -> dict[str, Any]:
    """The role's defaults, templated against each other like Ansible does, plus overrides."""
    context: dict[str, Any] = {
        "inventory_hostname": "pi-1",
        "role_path": str(ROLES / role),
        "playbook_dir": str(ANSIBLE),
        "ansible_playbook_python": "/usr/bin/python3",
        "ansible_managed": "Ansible managed",
        "ansible_facts": {},
        "groups": {"agents": ["pi-1"]},
        "ansible_play_hosts_all": ["pi-1"],
    }
    context.update(role_defaults(role))
    context.update(overrides)
    jinja = environment()
    for _ in range(5):  # defaults refer to defaults, a few levels deep at most
        for key, value in context.items():
            if isinstance(value, str) and "{{" in value:
                context[key] = jinja.from_string(value).render(context)
    return context


def render(role: str, template: str, **overrides: Any) -> str:
    source = (ROLES / role / "templates" / template).read_text()
    rendered: str = environment().from_string(source).render(variables(role, **overrides))
    return rendered
