// The page is served by kubetasks' own server at any path prefix (an Ingress may add one),
// so every URL is relative; the output goes into the Python package, which ships it.
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  build: {
    outDir: "../operator/kubetasks/dashboard/static",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    chunkSizeWarningLimit: 1000,
  },
});
