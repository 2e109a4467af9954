"""``kiln serve``: ComfyUI's HTTP/WebSocket API, answered from compiled plans where the graph
matches and by the interpreter otherwise. The front (``app``: routes, queue, history, messages)
hands each job to a worker pool (``pool``) behind one small interface."""
