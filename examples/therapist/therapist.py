"""Retell's Python demo agent as a callray agent.

The demo's ``LlmClient.draft_response`` builds a prompt from the transcript, streams an OpenAI
answer token by token and hangs up when the model calls ``end_call(message)``. Here the same
logic is one ``respond`` method; what the demo's server does around it (the socket, ping_pong,
response ids, superseded requests, reconnects, errors, the greeting once per call) is callray's.
"""

import json
import os

from openai import AsyncOpenAI
from pydantic import BaseModel

from callray import Agent, EndCall, Speech, Usage, phrases

ROLE = (
    "As a professional therapist, you establish a positive and trusting rapport with patients and "
    "help them with what troubles them. Communicate concisely and conversationally, ideally in under "
    "10 words. Be empathetic and understanding while keeping a professional stance."
)
STYLE = (
    "You are a voice AI agent in a human-like voice conversation. Keep answers short, do not repeat "
    "what is in the transcript, speak like a person, and lead the conversation. The transcript comes "
    "from speech recognition: if you can guess what the user meant, answer that."
)
END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "End the call only when the user explicitly asks to.",
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string", "description": "What to say before hanging up."}},
            "required": ["message"],
        },
    },
}


class Therapist(Agent):
    greeting = "Hey there, I'm your personal AI therapist, how can I help you?"

    class Options(BaseModel):
        model: str = "gpt-4o-mini"

    def __init__(self, options: Options):
        super().__init__(options)
        key = os.environ.get("OPENAI_API_KEY")
        base_url = os.environ.get("OPENAI_BASE_URL") or (None if key else "http://127.0.0.1:8100/v1")
        self.client = AsyncOpenAI(api_key=key or "local-no-key", base_url=base_url)

    async def respond(self, turn):
        messages = [{"role": "system", "content": f"{STYLE}\n\n## Role\n{ROLE}"}]
        for line in turn.transcript:
            messages.append({"role": "assistant" if line["role"] == "agent" else "user", "content": line.get("content", "")})
        if turn.kind == "reminder":
            messages.append({"role": "user", "content": "(Now the user has not responded in a while, you would say:)"})
        stream = await self.client.chat.completions.create(
            model=self.options.model, messages=messages, tools=[END_CALL], stream=True,
            stream_options={"include_usage": True})
        end_call = {"called": False, "arguments": ""}
        usage = []

        async def tokens():
            async with stream:  # closed at once when the caller talks over the answer
                async for chunk in stream:
                    if chunk.usage:
                        usage.append(Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    for call in delta.tool_calls or ():
                        if call.function:
                            end_call["called"] |= call.function.name == "end_call"
                            end_call["arguments"] += call.function.arguments or ""
                    if delta.content:
                        yield delta.content

        async for phrase in phrases(tokens()):  # tokens grouped into phrases: fewer, cheaper frames
            yield phrase
        if usage:
            yield usage[-1]  # counted in the call's events, analytics and live page
        if end_call["called"]:
            message = json.loads(end_call["arguments"] or "{}").get("message", "Goodbye.")
            yield Speech(message, no_interruption_allowed=True)
            yield EndCall()

    async def aclose(self):
        await self.client.close()
