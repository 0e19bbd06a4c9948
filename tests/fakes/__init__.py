"""Protocol-faithful upstream servers on loopback, for tests and benchmarks.

Each fake is an aiohttp web app speaking a provider's real wire format, with a `Faults`
script so a test can make the next calls fail the way real upstreams do.
"""
