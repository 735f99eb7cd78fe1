"""The smallest Python agent: it repeats the caller and counts their messages.

``turn.state`` is saved with the call after every turn, so the count survives a reconnect,
a restart and a move to another replica.
"""

from callray import Agent, EndCall, Speech


class Echo(Agent):
    greeting = "Hi, I'm the echo agent. Say something!"
    answers_at_once = True  # respond never waits on I/O: it runs inline in the turn

    async def respond(self, turn):
        turn.state["n"] = turn.state.get("n", 0) + 1      # survives reconnects and restarts
        yield Speech(f"You said: {turn.last_user_text}. That was message {turn.state['n']}.")
        if "bye" in turn.last_user_text.lower():
            yield EndCall()
