"""Sends several HTTP/1.1 requests in ONE write on one connection (pipelining) and
reads every response. usage: http_pipeline.py PORT PATH [PATH ...]"""
import socket
import sys


def main():
    port, paths = int(sys.argv[1]), sys.argv[2:]
    requests = "".join(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" for p in paths)
    last = f"GET /close HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((requests + last).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    print("responses", data.count(b"HTTP/1.1 "))


if __name__ == "__main__":
    main()
