export * from './compile.ts';
export { parseDuration } from './duration.ts';
export * from './errors.ts';
export * from './hosts.ts';
export * from './load.ts';
export * from './match.ts';
export type { Kind, SpecOf } from './schema/kinds.ts';
export type * from './schema/networking.ts';
