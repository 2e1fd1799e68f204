"""Hosts: the fleet table of `cube hosts`, probed in the background (controller.ui.fleetview);
the page re-reads its table fragment every few seconds."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from controller.ui.pages.common import render, ui

router = APIRouter()


@router.get("/hosts", response_class=HTMLResponse)
def hosts_page(request: Request) -> HTMLResponse:
    return render(request, "hosts.html", snap=ui(request).fleet.current(), now=time.time())


@router.get("/hosts/table", response_class=HTMLResponse)
def hosts_table(request: Request) -> HTMLResponse:
    return render(request, "_hosts_table.html", snap=ui(request).fleet.current(), now=time.time())
