"""`cube ui`: a web page over the controller library (hosts, jobs, submit, logs, outputs, try).

Imported only by the `cube ui` and `cube serve` commands, so FastAPI and friends load only when
a web server actually starts. See docs/INTERNALS.md "Web page (controller/ui/)".
"""
