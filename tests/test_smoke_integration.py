"""End to end: real rsync daemon, real twistd deploy-agent, real deploy-client."""

import deploy
from tests.harness import wait_until


def test_status_rlist_rsync_status_exec(site):
    """The quick-start path: status, rlist, rsync, wait, status in sync, exec."""
    r = site.client("--order=status", "--options=web")
    assert r.rc == 0, r.stderr
    c = r.content(site.agent.address, "status")
    assert c == {"return": "true", "alreadyRsync": "false", "transferFilesCount": "40",
                 "transferFilesSize": "80000", "transferDeleteCount": "0",
                 "agentVersion": deploy.__version__}
    r = site.client("--order=rsync", "--options=web")
    assert r.rc == 0
    checksum = r.content(site.agent.address, "rsync")["checksum"]

    def synced():
        c = site.client("--order=status", "--options=web").content(site.agent.address, "status")
        return c if c.get("lastRsync") else None

    c = wait_until(synced, 30, 0.2, "the sync to end")
    assert c["transferFilesCount"] == "0"
    assert c["lastRsync"]["outcome"] == "ok" and c["lastRsync"]["checksum"] == checksum
    r = site.client("--order=exec", "--options=service:echo,hello")
    assert r.rc == 0
