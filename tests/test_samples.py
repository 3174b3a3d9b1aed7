"""The commented agent samples in etc/ load as shipped, document every key the agent reads,
and still load with every example uncommented."""

from pathlib import Path

from deploy.config import RsyncGroup, ServerSettings, load_agent_config, load_jobs

ETC = Path(__file__).resolve().parent.parent / "etc"
# [server] keys that only the proxy reads.
PROXY_ONLY: set[str] = set()


def examples(text: str) -> dict[str, set[str]]:
    """section → keys of the `;key = value` example lines (section headers may be commented)."""
    out: dict[str, set[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.lstrip(";")
        if line.startswith("[") and line.rstrip().endswith("]"):
            section = line.strip().strip("[]")
        elif raw.startswith(";") and "=" in line and not raw.startswith((";;", "; ")):
            out.setdefault(section, set()).add(line.split("=")[0].strip().removesuffix("[]"))
    return out


def uncommented(text: str) -> str:
    lines = []
    for raw in text.splitlines():
        line = raw.lstrip(";")
        is_header = line.startswith("[") and line.rstrip().endswith("]")
        if raw.startswith(";") and not raw.startswith((";;", "; ")) and ("=" in line or is_header):
            lines.append(line)
        else:
            lines.append(raw)
    return "\n".join(lines) + "\n"


def test_agent_sample_loads_as_shipped():
    """etc/deploy_agent.ini loads unchanged with the original's defaults."""
    config = load_agent_config(str(ETC / "deploy_agent.ini"))
    assert config.server.port == 3440 and config.server.key_cipher is None
    assert config.allow_hosts == ["127.0.0.1"] and config.allow_paths == ["/tmp", "/home"]


def test_agent_sample_documents_every_key():
    """Every [server] key and every group key the agent reads has an example in the sample."""
    found = examples((ETC / "deploy_agent.ini").read_text())
    server = set(ServerSettings.__dataclass_fields__) - PROXY_ONLY - {"worker_method", "ipc_path"}
    assert server <= found["server"], server - found["server"]
    group_keys = {
        "dest",
        "src",
        "rsync",
        "rsh",
        "option",
        "exclude",
        "include",
        "queue_path",
        "max_delete",
        "allow_empty_source",
        # release mode
        "releases",
        "releases_path",
        "activate",
        "link_dest",
        "two_pass_min_files",  # two-pass release syncs (issue 17)
        "after_activate",
        "check",
        "check_timeout",
        "rollback_on_failed_check",
        "source_retry",  # a source at max connections (issue 13)
    }
    assert (
        set(RsyncGroup.__dataclass_fields__) - {"name", "line", "options", "excludes", "includes"}
        <= group_keys
    )
    assert group_keys <= found["rsync::group::groupname"]


def test_agent_sample_with_every_example_uncommented_loads(tmp_path):
    """Uncommenting every example of both agent samples gives a config that loads, with the
    example group and jobs."""
    jobs = tmp_path / "deploy_agent_exec.ini"
    jobs.write_text(uncommented((ETC / "deploy_agent_exec.ini").read_text()))
    text = uncommented((ETC / "deploy_agent.ini").read_text()).replace(
        "/etc/deploy/deploy_agent_exec.ini", str(jobs)
    )
    conf = tmp_path / "deploy_agent.ini"
    conf.write_text(text)
    config = load_agent_config(str(conf))
    group = config.groups["groupname"]
    assert group.options == ["--archive", "--delete", "--force"] and group.max_delete == 1000
    assert config.jobs["service:nginx"] == "/etc/init.d/nginx %s"
    assert config.server.ssl_private_key == "/etc/deploy/private.pem"
    assert config.server.state_path == "/var/lib/deploy" and config.server.rkill_grace == 5
    assert config.access.server_names == ["web1.example.com", "10.0.0.11"]
    assert set(config.access.keys) == {"ci", "deployer", "old"}
    assert config.access.policies["deployer"].jobs == ("service:nginx*",)
    assert config.server.dry_run_timeout == 300 and not config.server.allow_inline_remote_shell
    assert config.allow_sources == [
        "rsync.example.com",
        "10.0.0.0/8",
        "release.example.com::www/current",
    ]
    assert config.jobs["app:greet"] == "/bin/sh -c 'echo hello \"$1\"' sh %s"


def test_jobs_sample_loads_as_shipped():
    """etc/deploy_agent_exec.ini loads and defines service:echo."""
    assert load_jobs(str(ETC / "deploy_agent_exec.ini")) == {"service:echo": "/bin/echo %s"}
