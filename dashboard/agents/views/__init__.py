"""The pages and actions, one module per thing a person does.

- `browse`: the session list, a session's page and its older events.
- `start`: the start form.
- `steer`: prompt, interrupt, configure, kill and continue a session.
- `sandboxes`: the account's sandboxes; attach a session started elsewhere; kill a sandbox.
- `export`: a session as JSONL or Markdown, one event's full payload.
- `share`: create and revoke links, and the read-only page a link opens.

Views are plain sync functions unless they wait on the sandbox server. Each fetches what it
works on through `access` (the object and what the user may do with it) before anything else.
"""
