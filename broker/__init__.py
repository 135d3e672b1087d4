"""edgedi.broker: what travels over MQTT.

Import from the modules; this package imports nothing itself, so that the planner
can use `edgedi.broker.plan` without loading the network stack.

- `errors`     — the exception tree (BrokerError and below)
- `ids`        — DeviceId, JobId, ClusterName: safe single topic levels
- `tensors`    — Tensor and the msgpack codec (numpy only, never torch), Limits
- `plan`       — the Plan schema (written by the planner)
- `messages`   — every wire model, `encode()` / `decode()`
- `topics`     — the topic catalogue, `parse_topic()`, the reference page docs/topics.md
- `connection` — MqttSession: the aiomqtt connection loop (reconnects, dispatch)
- `server`     — private brokers: Mosquitto subprocess or embedded amqtt
"""
