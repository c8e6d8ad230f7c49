"""`python -m services.bots <session>...`: bots in a session's open slots (the same command as
`canopy bots`; `--help` lists its options)."""

from services.cli import bots

if __name__ == "__main__":
    bots.main(prog_name="python -m services.bots")
