# syntax=docker/dockerfile:1.7
# check=skip=all
ARG GO_VERSION=1.22
ARG BASE=alpine:3.20

FROM golang:${GO_VERSION} AS Build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/.cache \
    # fetch modules first
    go mod download

RUN go build -o /out/app ./cmd/app

FROM ${BASE} AS runtime
COPY --from=build /out/app /usr/local/bin/app
ENTRYPOINT ["/usr/local/bin/app"]

FROM runtime AS unused
RUN echo never built
