"""The robot bridge: a robot agent (robot side) and a client (runtime side) over ZeroMQ.

protocol.py  wire format (msgpack header + raw array frames), limits, error codes
safety.py    clamp, rate limit, stale/non-finite drops, watchdog (robot side)
agent.py     RobotDriver protocol, SimDriver, RobotAgent, run_robot_agent()
client.py    BridgeClient, RemoteEnv (env name `remote:tcp://HOST:PORT`)
keys.py      CurveZMQ key generation and loading
bench.py     bench_bridge(): in-process vs over-the-bridge round trips

The robot side (protocol, safety, agent, keys) imports only numpy, pyzmq and msgpack: never model code.
See docs/PROTOCOL.md for the wire format.
"""
