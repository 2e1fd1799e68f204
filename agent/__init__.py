"""cube agent: the only code that touches a host's files and processes.

A stdlib-only package for Python >= 3.8. The controller builds it into one zipapp
(controller.agent_bundle), uploads it to ROOT/agent/<digest>.pyz and runs
`python3 ROOT/agent/<digest>.pyz --root ROOT VERB [args]` (see agent.protocol for the answer
shape). The controller also imports `agent.sync` for its own side of a sync.
"""
