"""Bots: scripted participants that play a session's open slots (issue 9).

Not a service: a client of the public contract only (PROTOCOL.md's participants' WebSocket and
the researchers' HTTP API). `client` keeps one participant's socket as the JS client does,
`strategies` decides what a bot sends (pure), `runner` starts fleets (`start_bots`,
`fill_session`); `python -m services.bots <session>` and `canopy bots <session>` run them.
"""
