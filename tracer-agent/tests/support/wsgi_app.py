"""A WSGI application for gunicorn in the agent's integration tests.

  POST /ignore     answers 201 without reading the request body
  POST /read       reads the body and answers its size
  GET  /slow?s=N   answers after N seconds
"""
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/ignore":
        body = b"created\n"
        status = "201 Created"
    elif path == "/read":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = f"read {len(environ['wsgi.input'].read(size))}\n".encode()
        status = "200 OK"
    elif path == "/slow":
        time.sleep(float(parse_qs(environ["QUERY_STRING"]).get("s", ["1"])[0]))
        body = b"late\n"
        status = "200 OK"
    else:
        body = b"no such page\n"
        status = "404 Not Found"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
