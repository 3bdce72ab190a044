"""A small real HTTP/1.x server for the agent's integration tests.

usage: http_server.py PORT DIRECTORY [1.0|1.1] [CERT KEY]

GET serves files from DIRECTORY (404 when missing); POST reads the whole body and
answers 201 with its length. With 1.1, connections are kept alive. With
SET_COOKIE in the environment, every answer sets that cookie. With CERT and KEY
(PEM files), it serves HTTPS (Python's ssl module, the system's OpenSSL).
"""
import functools
import http.server
import os
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        cookie = os.environ.get("SET_COOKIE")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        super().end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        body = ('{"received": %d}' % (length - remaining)).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    version = sys.argv[3] if len(sys.argv) > 3 else "1.1"
    Handler.protocol_version = "HTTP/" + version
    handler = functools.partial(Handler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    if len(sys.argv) > 5:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[4], sys.argv[5])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
