"""twistd plugins: `twistd deploy-agent` and `twistd deploy-proxy`."""

from twisted.application.service import ServiceMaker

deploy_agent = ServiceMaker(
    "deploy-agent",
    "deploy.agent_tap",
    "deploy agent: runs rsync and configured commands on order",
    "deploy-agent",
)

deploy_proxy = ServiceMaker(
    "deploy-proxy",
    "deploy.proxy_tap",
    "deploy proxy: API keys and groups, fan-out of orders to agents",
    "deploy-proxy",
)
