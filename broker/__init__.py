"""The broker side: the accounts and topic table both brokers enforce (acl, accounts), and the
embedded amqtt broker (`votebox broker`, for the demo and small sites)."""
