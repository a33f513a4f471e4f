// Must come before @peculiar/x509: its dependency tsyringe refuses to load without Reflect metadata.
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';

// ---------------------------------------------------------------------------------------------------
// Per-run PKI

export interface Pki {
  readonly caPem: string;
  readonly caFile: string;
  /** DNS name → cert/key files and the leaf's serial number. */
  readonly leaves: ReadonlyMap<string, { readonly certFile: string; readonly keyFile: string; readonly serial: string; readonly fingerprint256: string }>;
}

const EC = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;

/**
 * A throw-away CA and one leaf per DNS name, written as PEM into `dir`. `usage: 'client'` makes
 * client certificates (clientAuth), which a server that verifies its clients accepts.
 */
export async function makePki(dir: string, names: readonly string[], opts: { readonly usage?: 'server' | 'client' } = {}): Promise<Pki> {
  const usage = opts.usage === 'client' ? x509.ExtendedKeyUsage.clientAuth : x509.ExtendedKeyUsage.serverAuth;
  const crypto = webcrypto;
  const provider = webcrypto as unknown as ReturnType<typeof x509.cryptoProvider.get>;
  x509.cryptoProvider.set(provider);
  const notBefore = new Date(Date.now() - 60_000);
  const notAfter = new Date(Date.now() + 24 * 3600_000);
  const caKeys = (await crypto.subtle.generateKey(EC, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: 'CN=meshgate test CA',
    notBefore,
    notAfter,
    keys: caKeys,
    signingAlgorithm: EC,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(caKeys.publicKey),
    ],
  });
  const caPem = ca.toString('pem');
  const caFile = join(dir, 'ca.pem');
  await writeFile(caFile, caPem);
  const leaves = new Map<string, { certFile: string; keyFile: string; serial: string; fingerprint256: string }>();
  let serial = 2;
  for (const name of names) {
    const keys = (await crypto.subtle.generateKey(EC, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
    const sn = (serial++).toString(16).padStart(2, '0');
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: sn,
      subject: `CN=${name}`,
      issuer: ca.subject,
      notBefore,
      notAfter,
      publicKey: keys.publicKey,
      signingKey: caKeys.privateKey,
      signingAlgorithm: EC,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([usage]),
        new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: name }]),
        await x509.AuthorityKeyIdentifierExtension.create(ca),
      ],
    });
    const pkcs8 = await crypto.subtle.exportKey('pkcs8', keys.privateKey);
    const certFile = join(dir, `${name}.crt`);
    const keyFile = join(dir, `${name}.key`);
    await writeFile(certFile, cert.toString('pem'));
    await writeFile(keyFile, x509.PemConverter.encode(pkcs8, 'PRIVATE KEY'));
    const thumb = Buffer.from(await cert.getThumbprint('SHA-256', provider)).toString('hex');
    leaves.set(name, { certFile, keyFile, serial: sn, fingerprint256: thumb });
  }
  return { caPem, caFile, leaves };
}
