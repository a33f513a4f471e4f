import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { after, describe, test } from 'node:test';

const ROOT = resolve(import.meta.dirname, '../..');
const CLI = 'gateway/src/cli.ts';

function validate(...paths: string[]) {
  const r = spawnSync(process.execPath, [CLI, 'validate', ...paths], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const dir = mkdtempSync(join(tmpdir(), 'meshgate-cli-'));
after(() => rmSync(dir, { recursive: true, force: true }));

describe('meshgate validate', () => {
  test('a valid folder: exit 0 and "valid" on stdout', () => {
    const r = validate('policies/examples');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^\d+ resource\(s\) in 8 file\(s\): valid\n$/);
    assert.equal(r.stderr, '');
  });

  test('an invalid folder with 3 errors in 2 files: exit 1 and one file:line:col line per error', () => {
    writeFileSync(
      join(dir, 'a.yaml'),
      `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec:
  hosts: [a.example.com]
  exportTo: ["."]
  http:
  - timeout: 5 seconds
    route:
    - destination: {host: a}
`,
    );
    writeFileSync(
      join(dir, 'b.yaml'),
      'apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b}\nspec:\n  selectr: {istio: ingressgateway}\n  servers: [{port: {number: 80, protocol: HTTP}, hosts: ["*"]}]\n',
    );
    const shown = relative(ROOT, dir);
    const r = validate(shown);
    assert.equal(r.status, 1, r.stdout);
    const lines = r.stderr.trimEnd().split('\n');
    for (const want of [
      `${shown}/a.yaml:6:3 VirtualService/default/a spec.exportTo: `,
      `${shown}/a.yaml:8:14 VirtualService/default/a spec.http[0].timeout: `,
      `${shown}/b.yaml:5:3 Gateway/default/b spec.selectr: `,
    ]) {
      assert.ok(
        lines.some((l) => l.startsWith(want)),
        `missing ${want} in:\n${r.stderr}`,
      );
    }
    assert.equal(lines.at(-1), '3 error(s) in 2 file(s)');
    assert.equal(r.stdout, '');
  });
});
