import assert from 'node:assert/strict';
import { test } from 'node:test';
import { policyChange } from '../src/edge/gateway.ts';

test('the policy watcher reacts to YAML files, extension-less names and ConfigMap swaps, not to logs or swap files', () => {
  for (const name of ['vs.yaml', 'sub/gw.YML', 'policies', '..data', '..2026_11_29_00_00_00.123', null]) assert.equal(policyChange(name), true, String(name));
  for (const name of ['access.log', '.vs.yaml.swp', 'notes.md', 'x.yaml~bak.tmp']) assert.equal(policyChange(name), false, name);
});
