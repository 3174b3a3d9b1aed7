"""The jobs file (`deploy_agent_exec.ini`): job name → command template, each template checked
when the file is loaded, so a template that would hand the caller's arguments to a shell stops
the agent at start rather than running."""

from __future__ import annotations

from collections.abc import Mapping

from deploy.commands import template_problem
from deploy.ini import ConfigError, IniSection, load_ini


def load_jobs(path: str) -> dict[str, str]:
    """Job name -> command template from a jobs file: `name = template` in any section."""
    return jobs_from_sections(load_ini(path, "jobs file"), path)


def jobs_from_sections(sections: Mapping[str, IniSection], path: str) -> dict[str, str]:
    """The jobs of a loaded jobs file; a ConfigError names the file and line of a bad one."""
    # Section names only group jobs for the reader; names share one namespace, so a name set
    # twice anywhere is refused at its second line rather than silently overridden.
    definitions = sorted(
        (line, entry)
        for section in sections.values()
        for entry in section.entries.values()
        for line in entry.lines
    )
    jobs: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, entry in definitions:
        name = entry.key
        if isinstance(entry.value, list):
            raise ConfigError(f"job {name!r}: write '{name} = command', not '{name}[]'", path, line)
        if name in first:
            raise ConfigError(
                f"job {name!r} is defined twice (first at line {first[name]})", path, line
            )
        first[name] = line
        jobs[name] = entry.value
    for name, template in jobs.items():
        if not template:
            raise ConfigError(f"job {name!r}: empty command", path, first[name])
        problem = template_problem(template)
        if problem is not None:
            raise ConfigError(f"job {name!r}: {problem}", path, first[name])
    return jobs
