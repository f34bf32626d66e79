"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Layout written under ``out`` (what ``orchard.remote.services.superlink/supernode`` expect)::

    certs/ca.crt  certs/ca.key            a private CA (self-signed, ECDSA P-384)
    certs/server.pem  certs/server.key    the SuperLink's certificate, signed by the CA
    keys/client_<i>  keys/client_<i>.pub  SuperNode i's auth key pair

Flower 1.42 reads a SuperNode's private key with ``load_ssh_private_key`` and
``flwr supernode register`` reads the public key with ``load_ssh_public_key`` (a NIST EC curve), so
both are written in OpenSSH format. Run it as ``python -m orchard.federated.certs OUT --clients N``
(``cluster/flower/make-certs.sh`` wraps it); it imports only ``cryptography``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "superlink")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Orchard"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, fmt: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)  # private keys readable by their owner only, as ssh and TLS servers expect


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:  # not an IP: a DNS name (a compose service name, localhost)
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("Orchard CA")).issuer_name(_name("Orchard CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_key(key, folder / "ca.key", serialization.PrivateFormat.TraditionalOpenSSL)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str]) -> None:
    """The SuperLink's certificate: gRPC checks the SAN, so every address clients dial must be listed."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_key(key, folder / "server.key", serialization.PrivateFormat.PKCS8)
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_node_keys(folder: Path, name: str) -> Path:
    """An ECDSA P-384 pair in OpenSSH format; returns the public key's path (what gets registered)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(key, folder / name, serialization.PrivateFormat.OpenSSH)
    public = folder / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def make_all(out: str | Path, clients: int, hosts: list[str] | None = None, force: bool = False) -> Path:
    """CA, server certificate and ``clients`` SuperNode key pairs under ``out``; returns ``out``.

    Files already there are kept unless ``force``: a restarted stack must neither rotate the CA (every
    SuperNode trusts it) nor replace registered SuperNode keys. Only missing key pairs are added.
    """
    if clients < 1:
        raise ValueError(f"clients must be at least 1, got {clients}")
    out = Path(out)
    certs, keys = out / "certs", out / "keys"
    certs.mkdir(parents=True, exist_ok=True)
    keys.mkdir(parents=True, exist_ok=True)
    if force or not all((certs / f).is_file() for f in ("ca.crt", "server.pem", "server.key")):
        ca_key, ca_cert = make_ca(certs)
        make_server_cert(certs, ca_key, ca_cert, list(hosts or DEFAULT_HOSTS))
    for i in range(clients):
        if force or not (keys / f"client_{i}").is_file() or not (keys / f"client_{i}.pub").is_file():
            make_node_keys(keys, f"client_{i}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchard.federated.certs", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write certs/ and keys/ into")
    p.add_argument("--clients", type=int, default=2, help="SuperNode key pairs to make (client_0 ...)")
    p.add_argument("--host", dest="hosts", action="append", default=None,
                   help=f"a name or IP the SuperLink is reached at (repeatable; default {', '.join(DEFAULT_HOSTS)})")
    p.add_argument("--force", action="store_true", help="replace existing certificates and keys")
    args = p.parse_args(argv)
    out = make_all(args.out, args.clients, args.hosts, args.force)
    print(f"{out}/certs: ca.crt, server.pem, server.key; {out}/keys: client_0..client_{args.clients - 1} (+ .pub)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
