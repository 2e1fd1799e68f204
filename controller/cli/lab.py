"""`cube lab up|down|status`: local SSH test hosts (see controller.lab)."""

from __future__ import annotations

from typing import Optional

import typer

from controller import lab, paths
from controller.cli import app

lab_app = typer.Typer(help="Local SSH test hosts (real sshd) for trying cube remote runs.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")


SELECTOR_HELP = "Lab hosts: a name, a comma list (lab1,lab3) or @lab; default: all."


@lab_app.command("up")
def up(hosts: int = typer.Option(1, "--hosts", "-n", help="How many hosts (lab1..labN, N <= 64)."),
       slots: Optional[int] = typer.Option(
           None, "--slots", help="Job slots per host, written to the inventory (default 1)."),
       netns: Optional[bool] = typer.Option(
           None, "--netns/--no-netns",
           help="Own network namespace per host (default: when root) or sshd on 127.0.0.1."),
       slurm: bool = typer.Option(False, "--slurm", help="lab1 is also a one-node Slurm cluster "
                                  "(munge, slurmctld, slurmd; inventory `scheduler: slurm`)."),
       slurm_cpus: Optional[int] = typer.Option(None, "--slurm-cpus",
                                                help="CPUs of the Slurm node (default: all)."),
       ) -> None:
    """Start lab hosts (running ones are kept) and add them to the inventory, group @lab."""
    started = lab.lab_up(hosts, netns=netns, slots=slots, slurm=slurm, slurm_cpus=slurm_cpus)
    for h in started:
        typer.echo(f"{h.name}: {h.address}:{h.port} ({h.mode}) root {h.root}")
    typer.echo(f"Inventory: {paths.inventory_file()}  known hosts: {paths.known_hosts_file()}")
    typer.echo(f"Try: cube remote run cubes/hello --host {started[0].name} --task greet")


@lab_app.command("down")
def down(selector: Optional[str] = typer.Argument(None, help=SELECTOR_HELP)) -> None:
    """Stop lab hosts and remove their inventory and known_hosts entries."""
    names = lab.lab_down(selector)
    typer.echo(f"Stopped {', '.join(names)}." if names else "No lab host was running.")


@lab_app.command("status")
def status(selector: Optional[str] = typer.Argument(None, help=SELECTOR_HELP)) -> None:
    """List lab hosts: address, sshd pid, up/down (a TCP connect check)."""
    hosts = lab.lab_status(selector)
    if not hosts:
        typer.echo("No lab hosts. Start some with `cube lab up --hosts 2`.")
        return
    for h in hosts:
        typer.echo(f"{h.name}\t{h.address}:{h.port}\tpid {h.pid}\t{h.mode}\t"
                   f"{'up' if h.up else 'down'}")
