"""The chat room: one turn of VILA-M3 with its experts (render, prompt, generate, trigger, feed back),
and the chats that persist between turns. The only place that knows the order of the steps."""
