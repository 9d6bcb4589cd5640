"""Translations between the APIs clients speak and the chat completions the chain serves.

Inbound (a client's API -> chat, and the chat answer back): `anthropic` /
`anthropic_stream` (Anthropic's Messages API), `responses` / `responses_stream` /
`responses_store` (OpenAI's Responses API). Outbound (chat -> an upstream's API, for the
`anthropic` provider): `to_anthropic`, `from_anthropic`. Every module is pure: bytes and
Structs in, bytes and Structs out, no I/O.
"""
