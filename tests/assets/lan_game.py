#!/usr/bin/env python3
"""What LAN games do, for the discovery lab (tests/tests/discovery.rs).

  listen PORT [GROUP]      bind 0.0.0.0:PORT (joined to GROUP on the default interface, as
                           Minecraft's LAN scan does); print "SRC:SPORT PAYLOAD" per datagram
  announce NAME GAMEPORT   Minecraft Java's LAN announcement to 224.0.2.60:4445 every 1.5 s:
                           [MOTD]NAME[/MOTD][AD]GAMEPORT[/AD]
  flood PORT RATE SECONDS  numbered broadcasts to 255.255.255.255:PORT at RATE per second;
                           prints "sent N in S s" at the end
"""
import socket
import struct
import sys
import time


def listen(port, group=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    if group:
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    print("listening", flush=True)
    while True:
        data, (ip, sport) = s.recvfrom(65535)
        text = data.decode("utf-8", "replace").strip().replace("\n", " ")
        print(f"{ip}:{sport} {text}", flush=True)


def announce(name, game_port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    msg = f"[MOTD]{name}[/MOTD][AD]{game_port}[/AD]".encode()
    while True:
        s.sendto(msg, ("224.0.2.60", 4445))
        time.sleep(1.5)


def flood(port, rate, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while n < due:
            s.sendto(f"flood {n}".encode(), ("255.255.255.255", port))
            n += 1
        time.sleep(0.001)
    print(f"sent {n} in {time.monotonic() - start:.3f} s", flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "listen":
        listen(int(args[0]), args[1] if len(args) > 1 else None)
    elif cmd == "announce":
        announce(args[0], int(args[1]))
    elif cmd == "flood":
        flood(int(args[0]), int(args[1]), float(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")
