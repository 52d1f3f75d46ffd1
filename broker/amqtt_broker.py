"""amqtt's broker with two fixes: credentials are checked before a CONNECT touches any
session, and retained messages go only to those who subscribed to them.

Rule: a refused CONNECT changes nothing. amqtt 0.12.1 (pinned in pyproject.toml) acts on a
CONNECT's client id before its auth plugins run: a clean-session CONNECT deletes the session
held under that id (the processor's queued votes, while it restarts), any other CONNECT
overwrites that session's credentials and last will, and either disconnects whoever holds the
id; only then is a refused client sent CONNACK 5. Here `_initialize_client_session` asks the
plugins first and turns a refusal away at once; the rest is amqtt's own code, unchanged.
tests/test_security.py shows an unauthenticated CONNECT under the processor's client id
losing no vote.
"""

from __future__ import annotations

from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.utils import gen_client_id

__all__ = ["AuthenticateFirstBroker"]


class AuthenticateFirstBroker(Broker):  # type: ignore[misc]  # amqtt ships no types
    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError:
            await writer.close()
            raise

        if not await self._authenticate(session, None):
            session.client_id = session.client_id or gen_client_id()
            session.parent = 0
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError(f"{session.client_id} ({remote_address}): not authorized")

        # From here on, amqtt 0.12.1's Broker._initialize_client_session as it is.
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            existing.will_flag = session.will_flag
            existing.will_message = session.will_message
            existing.will_topic = session.will_topic
            existing.will_qos = session.will_qos
            existing.keep_alive = session.keep_alive
            existing.username = session.username
            existing.password = session.password
            session = existing
            session.parent = 1
        else:
            session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            session.keep_alive += timeout_disconnect_delay
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        # amqtt 0.12.1 also calls this on every CONNECT, once for each filter that any client
        # ever subscribed to: a device connecting got the retained messages of the
        # processor's and dashboards' subscriptions (other devices' status, for one). Only
        # the session's own subscriptions, each already allowed by the topic plugin, count.
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, ())
        if any(holder.client_id == session.client_id for holder, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)
