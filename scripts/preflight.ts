/**
 * Runs before `npm test`: checks that the test suite has what it needs from the system and says the
 * exact install line otherwise, so a missing piece stops the run at once instead of failing halfway.
 */
import { spawnSync } from 'node:child_process';

const major = Number(process.versions.node.split('.')[0]);
process.stdout.write(`meshgate tests on Node ${process.version} (${process.platform}-${process.arch})\n`);
if (major < 24) {
  process.stderr.write(
    `Node ${process.version} is too old: run the tests through npm (\`npm test\`), which uses node_modules/.bin/node (Node 24) after \`npm ci\`.\n`,
  );
  process.exit(1);
}

interface Need {
  readonly cmd: string;
  readonly args: readonly string[];
  readonly apt: string;
  readonly why: string;
}
// What the suite needs from the machine beyond npm packages.
const needs: readonly Need[] = [
  { cmd: 'redis-server', args: ['--version'], apt: 'redis-server', why: 'quota tests run a real Redis, Sentinel and Cluster' },
  { cmd: 'redis-cli', args: ['--version'], apt: 'redis-tools', why: 'Redis Cluster bootstrap in the quota tests' },
];

const missing = needs.filter((n) => spawnSync(n.cmd, n.args, { stdio: 'ignore' }).status !== 0);
if (missing.length > 0) {
  const pkgs = missing.map((n) => n.apt).join(' ');
  if (process.getuid?.() === 0 && spawnSync('apt-get', ['--version'], { stdio: 'ignore' }).status === 0) {
    process.stdout.write(`installing ${pkgs}\n`);
    const r = spawnSync('sh', ['-c', `apt-get update -qq && apt-get install -y -qq ${pkgs}`], { stdio: 'inherit' });
    if (r.status !== 0) process.exit(1);
  } else {
    process.stderr.write(`missing: ${missing.map((n) => `${n.cmd} (${n.why})`).join(', ')}\ninstall with: sudo apt-get install -y ${pkgs}\n`);
    process.exit(1);
  }
}
