#!/usr/bin/env python3
"""An HBONE client written with another HTTP/2 implementation (Python's `h2`, over the
standard library's TLS), to check that the daemon speaks HBONE as the protocol says, not only
as our own client does.

It connects to ADDR over mutual TLS 1.3 with ALPN h2, sends one CONNECT to AUTHORITY with the
given extra headers, and, if the answer is 200, sends the payload, half-closes, and reads the
stream to its end. It prints one JSON object: the server's HTTP/2 settings, the status, the
response headers and the body it read.

Usage: hbone_client.py ADDR AUTHORITY CHAIN KEY ROOTS PAYLOAD [NAME=VALUE ...]
"""

import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.settings


def main():
    addr, authority, chain, key, roots, payload = sys.argv[1:7]
    extra = [tuple(h.split("=", 1)) for h in sys.argv[7:]]
    host, port = addr.rsplit(":", 1)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(roots)
    # The server's identity is its URI SAN, which this check does not read: the chain is
    # verified against the roots, the name is not.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])

    raw = socket.create_connection((host, int(port)), timeout=20)
    tls = ctx.wrap_socket(raw)
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()

    # h2 4.1 checks outgoing requests as if every method needed `:path` and `:scheme`; a
    # classic CONNECT (RFC 9113 §8.5) has neither, so that check is off for what we send.
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False
        )
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())

    settings = {}
    status = None
    headers = {}
    body = b""
    stream = None
    ended = False
    while not ended:
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                for code, change in event.changed_settings.items():
                    settings[h2.settings.SettingCodes(code).name] = change.new_value
                if stream is None:
                    stream = conn.get_next_available_stream_id()
                    request = [(":method", "CONNECT"), (":authority", authority)] + extra
                    conn.send_headers(stream, request)
            elif isinstance(event, h2.events.ResponseReceived):
                for name, value in event.headers:
                    if name == ":status":
                        status = int(value)
                    else:
                        headers[name] = value
                if status == 200:
                    conn.send_data(stream, payload.encode(), end_stream=True)
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                ended = True
        tls.sendall(conn.data_to_send())

    print(json.dumps({
        "settings": settings,
        "status": status,
        "headers": headers,
        "body": body.decode(errors="replace"),
    }))


if __name__ == "__main__":
    main()
